#!/usr/bin/env bash
# Sets up what is missing, builds the training demo, and runs the main job: a small CNN on
# Fashion-MNIST (examples/train_fashion_mnist.cpp). To show what the guards are for, the first
# run is interrupted with SIGINT (as Ctrl-C would) once it has trained a while; it saves and
# exits, and the same command then resumes it and trains to the end.
#   scripts/demo.sh [options for train_fashion_mnist, e.g. --epochs 1]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/configure.sh default
cmake --build "$build_dir" --target train_fashion_mnist
run_dir=$build_dir/demo
rm -rf "$run_dir"  # a fresh run each time: the demo shows a start, a stop and a resume
train=("$build_dir/examples/train_fashion_mnist" --run-dir "$run_dir" "$@")

echo "== $ ${train[*]}   (interrupted with SIGINT after 300 steps)"
# Job control on: a background job of a script would otherwise start with SIGINT ignored.
set -m
"${train[@]}" &
pid=$!
set +m
until [ "$(cat "$run_dir/metrics.jsonl" 2>/dev/null | wc -l)" -ge 6 ] ||
      ! kill -0 "$pid" 2>/dev/null; do
  sleep 0.2
done
kill -INT "$pid" 2>/dev/null || true
status=0
wait "$pid" || status=$?
[ "$status" -eq 130 ] || { echo "demo: expected the interrupted run to exit 130, got $status"; exit 1; }

echo
echo "== $ ${train[*]}   (the same command: resumes)"
"${train[@]}"
echo
echo "run directory: $run_dir (train.log, metrics.jsonl, loss.png, accuracy.png, plot.gp, parameters.xxh3, checkpoints/)"
