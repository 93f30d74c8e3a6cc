#!/usr/bin/env bash
# Proves the CUDA paths on a GPU, in one command, and prints a short report: each [cuda] test
# passed, failed or skipped, and each GPU figure. Under 6 minutes on one H200.
#   scripts/gpu-check.sh                on a GPU machine, in the project root: configures against
#                                       that machine's own PyTorch ($PYTHON, default python3) with
#                                       the dependencies carried in .deps/, builds only
#                                       torchguard_cuda_tests and bench_gpu (build/gpu), runs them
#   scripts/gpu-check.sh --cpu-dry-run  the same steps here, against the CPU build (build/default,
#                                       reused as it is when it exists): what needs a GPU skips
# .deps/ is made once where apt-get works (the GPU machine has no package registries):
#   DEVICE_DEPS_EXTRA=libgloo-dev ../shared/tools/device-deps
# (libgloo-dev: the torch wheel's c10d headers include Gloo's, which the wheel does not carry.)
# Exit status: 0 when no test failed (and, on a GPU machine, none skipped) and every figure came.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
case "${1:-}" in
  "") ;;
  --cpu-dry-run) mode=dry ;;
  *) echo "usage: scripts/gpu-check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
start=$SECONDS
say() { echo "gpu-check: $* ($((SECONDS - start)) s)"; }

if [[ $mode == gpu ]]; then
  if [[ ! -d .deps/usr/include/gloo ]]; then
    echo "gpu-check: .deps/ with Gloo's headers is missing: run, where apt-get works," >&2
    echo "  DEVICE_DEPS_EXTRA=libgloo-dev ../shared/tools/device-deps   and carry .deps" >&2
    exit 2
  fi
  say "configuring build/gpu against $(${PYTHON:-python3} -c 'import torch; print("PyTorch", torch.__version__)')"
  source scripts/configure.sh gpu || exit 2
elif [[ -f build/default/CMakeCache.txt ]]; then
  build_dir=build/default  # CI's, or an earlier build: reused as configured
else
  say "configuring build/default"
  source scripts/configure.sh default || exit 2
fi
say "building torchguard_cuda_tests and bench_gpu in $build_dir"
if ! cmake --build "$build_dir" --target torchguard_cuda_tests bench_gpu; then
  echo "gpu-check: FAILED: the build failed"
  exit 1
fi

logs=$build_dir/gpu-check
rm -rf "$logs" && mkdir -p "$logs"
tests=$build_dir/tests/torchguard_cuda_tests
# One process per test: a failure (or a wedged device) stays with its test.
mapfile -t names < <("$tests" --list-test-names-only "[cuda]" | sed -e 's/^ *//' -e '/^$/d' |
                     grep -v ' test cases$')
passed=0 failed=0 skipped=0
results=()
for i in "${!names[@]}"; do
  name=${names[$i]}
  spec=$(printf '%s' "$name" | sed -e 's/[],[\\]/\\&/g')  # Catch's test-spec escapes
  log=$logs/test-$i.log
  timeout 180 "$tests" "$spec" >"$log" 2>&1
  status=$?
  if ((status != 0)); then
    failed=$((failed + 1)) && results+=("  FAILED   $name (exit $status; $log)")
  elif grep -q "SKIPPED:" "$log"; then
    skipped=$((skipped + 1))
    results+=("  skipped  $name ($(grep -m1 -o 'SKIPPED:.*' "$log" | cut -c10-))")
  else
    passed=$((passed + 1)) && results+=("  passed   $name")
  fi
done
say "ran ${#names[@]} [cuda] tests"
timeout 300 "$build_dir/bench/bench_gpu" >"$logs/bench_gpu.log" 2>&1
bench_status=$?

echo
echo "== gpu-check report ($([[ $mode == gpu ]] && echo "GPU" || echo "CPU dry run"), $build_dir, $((SECONDS - start)) s) =="
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/device: /'
fi
echo "tests: $passed passed, $failed failed, $skipped skipped (of ${#names[@]})"
printf '%s\n' "${results[@]}"
echo "GPU figures (bench_gpu, exit $bench_status):"
grep -E "^device:|skipped|per batch|ratio|synchronous save:|background,|throughput" \
  "$logs/bench_gpu.log" | sed 's/^ */  /'
for i in "${!names[@]}"; do
  if ! grep -q "SKIPPED:" "$logs/test-$i.log" && grep -q "FAILED" "$logs/test-$i.log"; then
    echo "--- ${names[$i]}"
    tail -n 25 "$logs/test-$i.log"
  fi
done
if ((bench_status != 0)); then
  echo "--- bench_gpu"
  tail -n 25 "$logs/bench_gpu.log"
fi
ok=1
((failed == 0 && bench_status == 0 && ${#names[@]} > 0)) || ok=0
[[ $mode == gpu ]] && ((skipped > 0)) && ok=0  # on a GPU machine, nothing may skip
if ((ok)); then echo "result: PASS"; else echo "result: FAIL"; fi
((ok))
