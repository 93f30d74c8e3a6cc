#!/usr/bin/env bash
# Coverage-guided fuzzing (clang's libFuzzer) of the parsers that read what a disk hands back,
# without LibTorch: the safetensors header (checkpoint/safetensors_header.hpp) and the checkpoint
# manifest (checkpoint/manifest.hpp). For each harness tests/fuzz/<target>.cpp it
#   - installs what is missing (clang, its fuzzer and sanitizer runtimes, the headers), via apt;
#   - builds it with libFuzzer, AddressSanitizer (leaks included) and UndefinedBehaviorSanitizer
#     (every report fatal) into build/fuzz/<target>/;
#   - replays the inputs of tests/fuzz/crashes/<target>/, if any (each once: they must pass now;
#     when one fails, the target is not fuzzed);
#   - fuzzes it for the given seconds, starting from its seed corpus tests/fuzz/corpus/<target>/
#     (read only: what the run finds goes to the scratch corpus build/fuzz/<target>/corpus/, kept
#     between local runs), with its dictionary tests/fuzz/<target>.dict, inputs up to 64 KiB, a
#     per-input timeout and a memory limit;
#   - prints libFuzzer's final statistics: executions, executions per second, cov (code edges
#     reached) and ft (features), the corpus size.
# It fails on any crash, timeout, out-of-memory, leak or UBSan report (after trying every
# target), and shows the input that caused it (build/fuzz/<target>/crash-*, leak-*, timeout-*,
# oom-*). Reproduce with `build/fuzz/<target>/fuzzer
# <input>`; minimize with `build/fuzz/<target>/fuzzer -minimize_crash=1 -max_total_time=60
# <input>`, then keep it in tests/fuzz/crashes/<target>/ (replayed by every run from then on).
#   scripts/fuzz.sh [seconds-per-target]     default 60
#   FUZZ_TARGETS="manifest" scripts/fuzz.sh  only some targets
#   FUZZ_ARGS="-use_value_profile=1" scripts/fuzz.sh 1800   a long local run, more options
# What a long run found can join the repo corpus, as few files as keep its coverage:
#   build/fuzz/<target>/fuzzer -merge=1 tests/fuzz/corpus/<target> build/fuzz/<target>/corpus
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [seconds-per-target]" >&2
  exit 2
fi
read -r -a targets <<<"${FUZZ_TARGETS:-safetensors_header manifest}"

packages=(clang libclang-rt-14-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libxxhash-dev)
source scripts/apt.sh
apt_install_missing fuzz "${packages[@]}"

# Debian's spdlog uses the external fmt: FMT_HEADER_ONLY compiles fmt with the sanitizers too.
# shellcheck disable=SC2054  # the commas are clang's
flags=(-std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -Wall -Wextra -Werror -DFMT_HEADER_ONLY -Iinclude)
echo "fuzz: building ${targets[*]} (clang++ ${flags[*]})"
pids=()
for target in "${targets[@]}"; do
  mkdir -p "build/fuzz/$target/corpus"
  clang++ "${flags[@]}" "tests/fuzz/$target.cpp" -o "build/fuzz/$target/fuzzer" \
    >"build/fuzz/$target/build.log" 2>&1 &
  pids+=($!)
done
for i in "${!targets[@]}"; do
  if ! wait "${pids[$i]}"; then
    cat "build/fuzz/${targets[$i]}/build.log" >&2
    echo "fuzz: ${targets[$i]} does not build" >&2
    exit 1
  fi
done

export ASAN_OPTIONS=detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

count() { find "$1" -type f | wc -l; }

# Shows the input that failed and the end of the log; the script fails once every target ran.
failures=()
failed() {
  local target=$1 log=$2
  tail -n 60 "$log" | cut -c 1-300 >&2  # C++ frames' names can run to kilobytes
  for artifact in "build/fuzz/$target"/{crash,leak,timeout,oom,slow-unit}-*; do
    [ -e "$artifact" ] || continue
    echo "fuzz: $target: input $artifact ($(stat -c %s "$artifact") bytes), first 512:" >&2
    od -A d -c "$artifact" | head -n 32 >&2
  done
  echo "fuzz: $target FAILED (log: $log)" >&2
  failures+=("$target")
}

for target in "${targets[@]}"; do
  dir="build/fuzz/$target"
  rm -f "$dir"/{crash,leak,timeout,oom,slow-unit}-*
  options=(-dict="tests/fuzz/$target.dict" -max_len=65536 -timeout=10 -rss_limit_mb=2048
           -detect_leaks=1 -artifact_prefix="$dir/")
  still_failing=0
  for input in "tests/fuzz/crashes/$target"/*; do
    [ -e "$input" ] || continue
    log="$dir/replay-$(basename "$input").log"
    if ! "$dir/fuzzer" "${options[@]}" "$input" >"$log" 2>&1; then
      echo "fuzz: $target: $input still fails (log: $log):" >&2
      grep -m 3 -E "fuzz: line|ERROR: |SUMMARY: " "$log" | cut -c 1-300 >&2
      still_failing=$((still_failing + 1))
    fi
  done
  if ((still_failing)); then
    echo "fuzz: $target FAILED: $still_failing input(s) of tests/fuzz/crashes/$target" >&2
    failures+=("$target")
    continue
  fi
  echo "fuzz: $target: ${seconds} s from $(count "tests/fuzz/corpus/$target") seed(s) and" \
    "$(count "$dir/corpus") scratch input(s)"
  # The scratch corpus first: libFuzzer writes what it finds to the first directory only.
  # shellcheck disable=SC2086  # FUZZ_ARGS: options, split on purpose
  if ! "$dir/fuzzer" "${options[@]}" -max_total_time="$seconds" -print_final_stats=1 \
    ${FUZZ_ARGS:-} "$dir/corpus" "tests/fuzz/corpus/$target" >"$dir/fuzz.log" 2>&1 ||
    # A report that did not stop the run is a failure too.
    grep -qE "runtime error:|ERROR: (Address|Leak|UndefinedBehavior)Sanitizer" "$dir/fuzz.log"; then
    failed "$target" "$dir/fuzz.log"
    continue
  fi
  grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)" "$dir/fuzz.log" | sed "s/^/fuzz: $target: /"
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" \
    "$dir/fuzz.log" | sed "s/^/fuzz: $target: /"
done
if ((${#failures[@]})); then
  echo "fuzz: FAILED: ${failures[*]}" >&2
  exit 1
fi
echo "fuzz: no crash, timeout, leak or sanitizer report"
