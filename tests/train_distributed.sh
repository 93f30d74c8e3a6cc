#!/usr/bin/env bash
# The data-parallel demo through scripts/launch.sh, end to end:
#   tests/train_distributed.sh <launch.sh> <train_distributed binary>
# Two ranks train; SIGINT to the launcher reaches both, which agree on a step, save and exit 130;
# the same command resumes both from that step and finishes.
set -uo pipefail
launch=$1
binary=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-distributed-XXXXXX")
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/script_support.sh"
run=("$launch" --grace 20 2 "$binary" --run-dir "$work/run" --max-steps 300 --checkpoint-every 25
     --timeout 60)

# Job control on: a background job of a script would otherwise start with SIGINT ignored.
set -m
"${run[@]}" > "$work/first.out" 2>&1 &
pid=$!
set +m
# Interrupt after the first checkpoint.
for _ in $(seq 900); do
  ls -d "$work/run/checkpoints"/ckpt-* > /dev/null 2>&1 && break
  sleep 0.1
done
interrupt_run "$pid" "$work/first.out"

"${run[@]}" > "$work/second.out" 2>&1 || { cat "$work/second.out"; fail "the resumed job failed"; }
grep -q "\[rank 0\] resumed from step" "$work/second.out" || { cat "$work/second.out"; fail "did not resume"; }
grep -q "\[rank 0\] 2 ranks: 300 steps" "$work/second.out" || { cat "$work/second.out"; fail "did not finish"; }
echo "passed"
