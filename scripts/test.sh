#!/usr/bin/env bash
# Sets up what is missing, builds, and runs the whole test suite (ends with ctest's summary).
#   scripts/test.sh           Debian's LibTorch 1.13, C++17
#   scripts/test.sh asan      the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   scripts/test.sh tsan      the concurrent parts' tests under ThreadSanitizer
#   scripts/test.sh torch2    LibTorch 2.x from the torch wheel (a CUDA build), C++20
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-default}
source scripts/configure.sh "$config"
cmake --build "$build_dir"
ctest --test-dir "$build_dir" --output-on-failure -j "$(nproc)"
