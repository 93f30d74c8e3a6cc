#!/usr/bin/env bash
# Sets up what is missing, builds the examples, and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/configure.sh default
cmake --build "$build_dir" --target quickstart
mkdir -p "$build_dir/run" && cd "$build_dir/run"
"../examples/quickstart"
