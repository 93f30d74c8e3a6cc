#!/usr/bin/env bash
# The adoption example end to end: tests/adopt_mnist.sh <binary>
# pytorch/examples' MNIST program adopted to torchguard, run on Fashion-MNIST (the same idx
# format): a run interrupted with SIGINT inside an epoch exits 130; the same command resumes at
# the next batch of that epoch (not at its start: "resumed mid-epoch", at the sample the
# interrupted step reached) and ends with the same parameters, bit for bit, as a run never
# interrupted.
set -uo pipefail
binary=$1
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-adopt-XXXXXX")
trap 'rm -rf "$work"' EXIT

source "$(dirname "$0")/script_support.sh"
fingerprint() { sed -n 's/.*finished at step [0-9]*; parameters \([0-9a-f]*\).*/\1/p' "$1"; }

# torch::data::datasets::MNIST reads the uncompressed files; Debian ships them gzipped.
dataset=/usr/share/datasets/fashion-mnist
mkdir "$work/data"
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
            t10k-labels-idx1-ubyte; do
  gunzip -c "$dataset/$name.gz" > "$work/data/$name" ||
    fail "cannot decompress $dataset/$name.gz (scripts/setup.sh installs dataset-fashion-mnist)"
done

# Short, and the same arithmetic in every run: one epoch cut at 300 of its 938 steps, one
# intra-op thread (the thread count fixes the arithmetic; with two, OpenMP threads spin-waiting
# against the loader's two workers on a 2-core machine took 25 s for 150 steps instead of 3 s).
common=(--data-dir "$work/data" --threads 1 --epochs 1 --max-steps 300 --checkpoint-every 50)
batch=64

"$binary" "${common[@]}" --run-dir "$work/straight" > "$work/straight.out" 2>&1 ||
  { cat "$work/straight.out"; fail "the uninterrupted run failed"; }
expect_in "$work/straight.out" "finished at step 300"

# Job control on: a background job of a script would otherwise start with SIGINT ignored.
set -m
"$binary" "${common[@]}" --run-dir "$work/interrupted" > "$work/first.out" 2>&1 &
pid=$!
set +m
# Interrupt once it has trained past its first checkpoint (step 50): a committed ckpt-* directory.
for _ in $(seq 1200); do
  compgen -G "$work/interrupted/checkpoints/ckpt-*" > /dev/null && break
  kill -0 "$pid" 2> /dev/null || break
  sleep 0.05
done
interrupt_run "$pid" "$work/first.out"
step=$interrupted_step
if [ "$step" -le 0 ] || [ "$step" -ge 300 ]; then
  fail "interrupted at step '$step', not inside the run"
fi

"$binary" "${common[@]}" --run-dir "$work/interrupted" > "$work/second.out" 2>&1 ||
  { cat "$work/second.out"; fail "the resumed run failed"; }
expect_in "$work/second.out" "resumed from step $step "
# The place in the epoch is what the loop trained, not what the loader had fetched ahead.
expect_in "$work/second.out" "resumed mid-epoch: epoch 1 at sample $((step * batch)) of 60000"
expect_in "$work/second.out" "finished at step 300"

straight=$(fingerprint "$work/straight.out")
resumed=$(fingerprint "$work/second.out")
[ -n "$straight" ] || fail "no fingerprint in the uninterrupted run's output"
[ "$straight" = "$resumed" ] ||
  fail "parameters differ: $straight uninterrupted, $resumed interrupted at step $step and resumed"
# Run again once finished: it says so and trains nothing.
"$binary" "${common[@]}" --run-dir "$work/straight" > "$work/again.out" 2>&1 ||
  { cat "$work/again.out"; fail "the finished run, run again, failed"; }
expect_in "$work/again.out" "the run is complete at step 300; parameters $straight"
echo "passed: interrupted at step $step, resumed, parameters $resumed in both runs"
