#!/usr/bin/env bash
# The training demo's behaviour, end to end: tests/train_fashion_mnist.sh <binary> <case>
#   short       a short run writes its run directory
#   resume      SIGINT saves and exits 130; the rerun resumes and ends bitwise equal to a run
#               that was never interrupted, with the same metrics.jsonl figures, and the same
#               scalars in TensorBoard (when Python with tensorboard is there)
#   bad-data    a missing directory, a truncated file and a bad magic number: clear errors
#   fallback    a corrupt newest checkpoint is quarantined; the run resumes from the previous one
#               and still ends equal to an uninterrupted run, with the same figures (in
#               metrics.jsonl and in TensorBoard)
#   settings-refused  a resume with another --batch-size is refused, naming the setting and both
#               values, and leaves the checkpoints and metrics as they were
#   settings-warned   a resume with another --lr goes on with a warning and the new value
#   complete    a finished run, run again, says so and writes nothing; a larger --max-steps goes on
#   restore     --restore <step> resumes from an older checkpoint, --restore none starts fresh;
#               when every checkpoint is damaged, the error names --restore none
#   file-errors a TensorBoard file whose fsync fails at the end, a metrics file whose write
#               returns 0: the run's status is 1, with the file named (tests/io_faults.c, the
#               shim: its path is the third argument)
#   crossing    a run goes C++ -> Python -> C++ (examples/fashion_mnist.py train, through python/'s
#               package) and Python -> C++ -> Python, 200 steps on each side, and ends with the
#               parameters and Adam's state of a run done in one language, bit for bit (needs the
#               Python whose torch is this LibTorch, the fourth argument's version)
#   python      PyTorch and the demo share weights: Python's initial weights start the demo
#               (--init-from), and Python evaluates the demo's newest checkpoint to the demo's
#               own test accuracy (needs Python with safetensors; skipped visibly without it)
#   full-disk   a save that fails mid-run (a 12 MiB file system: two checkpoints fit, the third
#               does not) ends with the error and exit status 1, never a crash, and the committed
#               checkpoints stay (needs the privilege to mount; skipped visibly without it)
set -uo pipefail
binary=$1
case_name=$2
faults_library=${3:-}
libtorch_version=${4:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-demo-XXXXXX")
trap 'umount "$work/disk" 2>/dev/null; rm -rf "$work"' EXIT
# Small and quick, and the same in every run: the thread count fixes the arithmetic.
common=(--threads 2 --no-plots --eval-samples 1000 --log-every 10)

source "$(dirname "$0")/script_support.sh"
fingerprint() { cat "$1/parameters.xxh3"; }
# The training figures of two run directories agree: metrics.jsonl without its timing fields
# (time, speed and memory differ by nature).
figures() {  # figures <run dir>
  sed -E 's/"(elapsed_s|samples_per_s|epoch_s|memory_peak_mib)":[^,}]*,?//g' "$1/metrics.jsonl"
}
same_figures() {  # same_figures <run dir> <run dir>
  [ "$(figures "$1")" = "$(figures "$2")" ] || {
    diff <(figures "$1") <(figures "$2")
    fail "metrics.jsonl differs between $1 and $2"
  }
}
# TensorBoard (the real reader, tests/tensorboard_interop.py) shows two run directories alike:
# the same tags, and for each the same steps with bit-equal values (timing tags aside).
same_board() {  # same_board <run dir> <run dir>
  local python
  python=$(interop_python tensorboard) || {
    echo "note: TensorBoard not compared (no Python with tensorboard)"
    return 0
  }
  "$python" "$(dirname "$0")/tensorboard_interop.py" read "$1" "$2" > "$work/board.json" ||
    fail "tensorboard_interop.py could not read $1 and $2"
  "$python" - "$work/board.json" <<'EOF' || fail "TensorBoard shows $1 and $2 differently"
import json, sys
timing = {"samples_per_s", "epoch_s", "memory_peak_mib"}
runs = list(json.load(open(sys.argv[1])).values())
views = [{tag: [row[:2] for row in rows] for tag, rows in run["scalars"].items()
          if tag not in timing} for run in runs]
if not views[0] or views[0] != views[1]:
    for tag in sorted(set(views[0]) | set(views[1])):
        if views[0].get(tag) != views[1].get(tag):
            print(f"{tag}: {views[0].get(tag)}\n  vs {views[1].get(tag)}")
    sys.exit(1)
EOF
}
# Every file of a directory with its checksum (the lock file names the last run: not data).
checksums() { (cd "$1" && find . -type f ! -name .lock | sort | xargs md5sum); }

case "$case_name" in
  short)
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 > "$work/out" 2>&1 ||
      { cat "$work/out"; fail "exit status $?"; }
    expect_in "$work/out" "finished at step 30"
    for file in train.log metrics.jsonl parameters.xxh3; do
      [ -s "$work/run/$file" ] || fail "$file missing from the run directory"
    done
    expect_in "$work/run/metrics.jsonl" '"step":10,'
    expect_in "$work/run/metrics.jsonl" '"epoch":1'
    [ "$(ls -d "$work/run/checkpoints"/ckpt-* | wc -l)" -ge 1 ] || fail "no checkpoint"
    "$binary" --help > "$work/help" 2>&1 || fail "--help failed"
    expect_in "$work/help" "--max-steps"
    ;;
  resume)
    "$binary" "${common[@]}" --run-dir "$work/straight" --max-steps 400 > "$work/straight.out" 2>&1 ||
      { cat "$work/straight.out"; fail "the uninterrupted run failed"; }
    # Job control on: a background job of a script would otherwise start with SIGINT ignored.
    set -m
    "$binary" "${common[@]}" --run-dir "$work/interrupted" --max-steps 400 \
      > "$work/first.out" 2>&1 &
    pid=$!
    set +m
    # Interrupt once it has trained a little (metrics.jsonl gets a row every 10 steps).
    for _ in $(seq 600); do
      rows=$(wc -l < "$work/interrupted/metrics.jsonl" 2>/dev/null || echo 0)
      [ "$rows" -ge 4 ] && break
      sleep 0.1
    done
    interrupt_run "$pid" "$work/first.out"
    # The log says what happened: a stop at a step, by the signal; never "completed".
    stopped_at=$interrupted_step
    expect_in "$work/first.out" "Training session 'fashion-mnist' stopped at step $stopped_at by SIGINT"
    ! grep -q "completed successfully" "$work/first.out" ||
      fail "the interrupted run logged 'completed successfully'"
    "$binary" "${common[@]}" --run-dir "$work/interrupted" --max-steps 400 > "$work/second.out" 2>&1 ||
      { cat "$work/second.out"; fail "the resumed run failed"; }
    expect_in "$work/second.out" "resumed from step"
    expect_in "$work/second.out" "finished at step 400"
    [ "$(fingerprint "$work/straight")" = "$(fingerprint "$work/interrupted")" ] ||
      fail "parameters differ: $(fingerprint "$work/straight") uninterrupted," \
           "$(fingerprint "$work/interrupted") interrupted and resumed"
    same_figures "$work/straight" "$work/interrupted"
    same_board "$work/straight" "$work/interrupted"
    ;;
  bad-data)
    "$binary" "${common[@]}" --run-dir "$work/run" --data-dir "$work/nowhere" > "$work/out" 2>&1 &&
      fail "a missing data directory was accepted"
    expect_in "$work/out" "$work/nowhere"
    expect_in "$work/out" "does not exist"
    mkdir "$work/data"
    "$binary" "${common[@]}" --run-dir "$work/run" --data-dir "$work/data" > "$work/out" 2>&1 &&
      fail "an empty data directory was accepted"
    expect_in "$work/out" "train-images-idx3-ubyte.gz"
    cp /usr/share/datasets/fashion-mnist/*.gz "$work/data/"
    # Truncated: the first half of the compressed training images.
    size=$(stat -c %s "$work/data/train-images-idx3-ubyte.gz")
    truncate -s $((size / 2)) "$work/data/train-images-idx3-ubyte.gz"
    "$binary" "${common[@]}" --run-dir "$work/run" --data-dir "$work/data" > "$work/out" 2>&1 &&
      fail "a truncated file was accepted"
    expect_in "$work/out" "train-images-idx3-ubyte.gz"
    expect_in "$work/out" "truncated"
    # Labels where images belong: a bad magic number.
    cp /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz "$work/data/train-images-idx3-ubyte.gz"
    "$binary" "${common[@]}" --run-dir "$work/run" --data-dir "$work/data" > "$work/out" 2>&1 &&
      fail "a labels file was accepted as images"
    expect_in "$work/out" "bad magic number"
    [ ! -e "$work/run/checkpoints" ] || [ -z "$(ls "$work/run/checkpoints")" ] ||
      fail "a failed start wrote a checkpoint"
    ;;
  fallback)
    "$binary" "${common[@]}" --run-dir "$work/straight" --max-steps 40 > "$work/straight.out" 2>&1 ||
      { cat "$work/straight.out"; fail "the uninterrupted run failed"; }
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 --checkpoint-every 10 \
      > "$work/first.out" 2>&1 || { cat "$work/first.out"; fail "the first run failed"; }
    newest=$(ls -d "$work/run/checkpoints"/ckpt-* | sort | tail -1)
    case "$newest" in *-step-30) ;; *) fail "newest checkpoint is $newest, not step 30" ;; esac
    # Flip one byte in the middle of the newest checkpoint's tensors.
    tensors="$newest/model.safetensors"
    offset=$(($(stat -c %s "$tensors") / 2))
    byte=$(od -An -tu1 -j "$offset" -N1 "$tensors" | tr -d ' ')
    printf "$(printf '\\%03o' $(((byte + 1) % 256)))" |
      dd of="$tensors" bs=1 seek="$offset" conv=notrunc status=none
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 40 --checkpoint-every 10 \
      > "$work/second.out" 2>&1 || { cat "$work/second.out"; fail "the resumed run failed"; }
    expect_in "$work/second.out" "resumed from step 20"
    expect_in "$work/second.out" "quarantine"
    [ -n "$(ls "$work/run/checkpoints/quarantine")" ] || fail "nothing in quarantine/"
    [ "$(fingerprint "$work/straight")" = "$(fingerprint "$work/run")" ] ||
      fail "parameters differ after the fallback"
    # Steps 21 to 30 were trained twice; metrics.jsonl and TensorBoard show them once, like the
    # uninterrupted run.
    same_figures "$work/straight" "$work/run"
    same_board "$work/straight" "$work/run"
    ;;
  settings-refused)
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 20 > "$work/first.out" 2>&1 ||
      { cat "$work/first.out"; fail "the first run failed"; }
    before=$(checksums "$work/run/checkpoints")
    metrics=$(cat "$work/run/metrics.jsonl")
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 40 --batch-size 32 \
      > "$work/second.out" 2>&1 && { cat "$work/second.out"; fail "a changed --batch-size was accepted"; }
    expect_in "$work/second.out" "--batch-size is 32 in this run but was 64"
    [ "$(checksums "$work/run/checkpoints")" = "$before" ] || fail "the refused run changed the checkpoints"
    [ "$(cat "$work/run/metrics.jsonl")" = "$metrics" ] || fail "the refused run changed metrics.jsonl"
    ;;
  settings-warned)
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 20 > "$work/first.out" 2>&1 ||
      { cat "$work/first.out"; fail "the first run failed"; }
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 --lr 0.002 > "$work/second.out" 2>&1 ||
      { cat "$work/second.out"; fail "a changed --lr was refused"; }
    expect_in "$work/second.out" "resumed from step 20"
    expect_in "$work/second.out" "--lr changed from 0.001 to 0.002"
    expect_in "$work/second.out" "finished at step 30"
    expect_in "$work/run/metrics.jsonl" '"step":30,'
    [ "$(grep -c '"lr":0.002' "$work/run/metrics.jsonl")" -eq 1 ] || fail "no metrics row with the new --lr"
    newest=$(ls -d "$work/run/checkpoints"/ckpt-* | sort | tail -1)
    grep -Eq '"--lr": ?0.002' "$newest/manifest.json" ||
      fail "the new --lr is not in the settings of $newest"
    ;;
  python)
    python=$(interop_python safetensors.torch) || { echo "$python"; exit 0; }
    script="$(dirname "$0")/../examples/fashion_mnist.py"
    "$python" "$script" init "$work/init.safetensors" --seed 5 > "$work/init.out" 2>&1 ||
      { cat "$work/init.out"; fail "fashion_mnist.py init failed"; }
    for run in plain init; do
      extra=()
      [ "$run" = init ] && extra=(--init-from "$work/init.safetensors")
      "$binary" "${common[@]}" --run-dir "$work/$run" --max-steps 30 "${extra[@]}" \
        > "$work/$run.out" 2>&1 || { cat "$work/$run.out"; fail "the $run run failed"; }
    done
    expect_in "$work/init/train.log" "initialized the model from $work/init.safetensors"
    [ "$(fingerprint "$work/plain")" != "$(fingerprint "$work/init")" ] ||
      fail "--init-from changed nothing"
    "$python" "$script" evaluate "$work/init/checkpoints" --samples 1000 > "$work/eval.out" 2>&1 ||
      { cat "$work/eval.out"; fail "fashion_mnist.py evaluate failed"; }
    expect_in "$work/eval.out" "ckpt-000001-step-30: test accuracy"
    python_accuracy=$(sed -E 's/.*test accuracy ([0-9.]+).*/\1/' "$work/eval.out")
    demo_accuracy=$(grep -o '"test_accuracy":[0-9.]*' "$work/init/metrics.jsonl" | tail -1 | cut -d: -f2)
    "$python" -c "import sys; sys.exit(abs($python_accuracy - $demo_accuracy) > 0.0015)" ||
      fail "Python evaluates the checkpoint to $python_accuracy, the demo to $demo_accuracy"
    # A Python file that does not fit: every problem named, nothing trained.
    "$python" -c "import torch; from safetensors.torch import save_file; save_file({'fc1.weight': torch.zeros(3)}, '$work/bad.safetensors')"
    "$binary" "${common[@]}" --run-dir "$work/bad" --max-steps 30 --init-from "$work/bad.safetensors" \
      > "$work/bad.out" 2>&1 && fail "a state_dict that does not fit was accepted"
    expect_in "$work/bad.out" "missing keys: 'conv1.weight'"
    expect_in "$work/bad.out" "fc1.weight: shape [3] in '$work/bad.safetensors', [128, 3136] in the module"
    ;;
  full-disk)
    mkdir "$work/disk"
    if ! mount -t tmpfs -o size=12m tmpfs "$work/disk" 2>/dev/null; then
      echo "SKIPPED: cannot mount a small tmpfs here (not privileged)"
      exit 0
    fi
    "$binary" "${common[@]}" --run-dir "$work/disk/run" --max-steps 40 --checkpoint-every 10 \
      > "$work/out" 2>&1
    status=$?
    [ "$status" -eq 1 ] || { cat "$work/out"; fail "exit status $status, not 1"; }
    expect_in "$work/out" "error: CheckpointGuard: cannot save the checkpoint of step 30"
    expect_in "$work/out" "No space left on device"
    expect_in "$work/out" "Training session 'fashion-mnist' failed at step"
    expect_in "$work/disk/run/train.log" "No space left on device"
    [ "$(ls "$work/disk/run/checkpoints")" = "$(printf 'ckpt-000001-step-10\nckpt-000002-step-20')" ] ||
      fail "checkpoints after the failed save: $(ls "$work/disk/run/checkpoints")"
    ;;
  complete)
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 20 > "$work/first.out" 2>&1 ||
      { cat "$work/first.out"; fail "the first run failed"; }
    before=$(checksums "$work/run/checkpoints")
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 20 > "$work/again.out" 2>&1 ||
      { cat "$work/again.out"; fail "the same command again failed"; }
    expect_in "$work/again.out" "the run is complete at step 20"
    [ "$(checksums "$work/run/checkpoints")" = "$before" ] || fail "the finished run wrote again"
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 > "$work/more.out" 2>&1 ||
      { cat "$work/more.out"; fail "a larger --max-steps failed"; }
    expect_in "$work/more.out" "goes on to step 30"
    expect_in "$work/more.out" "finished at step 30"
    ;;
  restore)
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 --checkpoint-every 10 \
      > "$work/first.out" 2>&1 || { cat "$work/first.out"; fail "the first run failed"; }
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 --checkpoint-every 10 \
      --restore 20 > "$work/older.out" 2>&1 || { cat "$work/older.out"; fail "--restore 20 failed"; }
    expect_in "$work/older.out" "resumed from step 20"
    expect_in "$work/older.out" "finished at step 30"
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 10 --restore none \
      > "$work/fresh.out" 2>&1 || { cat "$work/fresh.out"; fail "--restore none failed"; }
    expect_in "$work/fresh.out" "starting fresh (restore = \"none\")"
    expect_in "$work/fresh.out" "finished at step 10"
    for manifest in "$work/run/checkpoints"/ckpt-*/manifest.json; do echo garbage > "$manifest"; done
    "$binary" "${common[@]}" --run-dir "$work/run" --max-steps 30 > "$work/damaged.out" 2>&1 &&
      fail "a directory of damaged checkpoints was accepted"
    expect_in "$work/damaged.out" "no valid checkpoint"
    expect_in "$work/damaged.out" "--restore none starts fresh"
    ;;
  file-errors)
    [ -n "$faults_library" ] || fail "no io_faults library given"
    LD_PRELOAD=$faults_library TORCHGUARD_FAULTS="fsync:events.out.tfevents:EIO" \
      "$binary" "${common[@]}" --run-dir "$work/board" --max-steps 20 > "$work/board.out" 2>&1
    status=$?
    [ "$status" -eq 1 ] || { cat "$work/board.out"; fail "exit status $status, not 1"; }
    expect_in "$work/board.out" "TensorBoard: cannot fsync"
    expect_in "$work/board.out" "Input/output error"
    ! grep -q "^finished at step" "$work/board.out" || true
    LD_PRELOAD=$faults_library TORCHGUARD_FAULTS="write:metrics.jsonl:0:1" \
      timeout 120 "$binary" "${common[@]}" --run-dir "$work/metrics" --max-steps 20 \
      > "$work/metrics.out" 2>&1
    status=$?
    [ "$status" -eq 1 ] || { cat "$work/metrics.out"; fail "exit status $status, not 1"; }
    expect_in "$work/metrics.out" "cannot write metrics to"
    expect_in "$work/metrics.out" "No space left on device"
    ;;
  crossing)
    python=$(libtorch_python "$libtorch_version" "torchguard, safetensors") || { echo "$python"; exit 0; }
    twin=($python "$(dirname "$0")/../examples/fashion_mnist.py" train --threads 2 --batch-size 32
          --checkpoint-every 100)
    cpp=("$binary" "${common[@]}" --batch-size 32 --checkpoint-every 100)
    compare() {  # compare <run dir> <run dir>: the newest checkpoints' parameters and Adam's state
      $python "$(dirname "$0")/python_parts.py" compare "$1/checkpoints" "$2/checkpoints" \
        > "$work/compare.out" 2>&1 || { cat "$work/compare.out"; fail "$1 and $2 differ"; }
    }
    run() {  # run <name> <command...>: a segment, its output kept
      local name=$1
      shift
      "$@" > "$work/$name.out" 2>&1 || { cat "$work/$name.out"; fail "$name failed"; }
    }
    run cpp-alone "${cpp[@]}" --run-dir "$work/cpp" --max-steps 600
    run cpp-1 "${cpp[@]}" --run-dir "$work/cross" --max-steps 200
    run python-2 "${twin[@]}" "$work/cross" --max-steps 400
    expect_in "$work/python-2.out" "resumed from step 200"
    run cpp-3 "${cpp[@]}" --run-dir "$work/cross" --max-steps 600
    expect_in "$work/cpp-3.out" "resumed from step 400"
    compare "$work/cpp" "$work/cross"
    run python-alone "${twin[@]}" "$work/python" --max-steps 600
    run python-1 "${twin[@]}" "$work/back" --max-steps 200
    run cpp-2 "${cpp[@]}" --run-dir "$work/back" --max-steps 400
    expect_in "$work/cpp-2.out" "resumed from step 200"
    run python-3 "${twin[@]}" "$work/back" --max-steps 600
    compare "$work/python" "$work/back"
    [ "$(fingerprint "$work/cpp")" = "$(sed -nE 's/.*parameters ([0-9a-f]+).*/\1/p' "$work/python-3.out")" ] ||
      echo "note: C++ alone and Python alone differ (their initial weights are each language's own)"
    ;;
  *)
    fail "unknown case '$case_name'"
    ;;
esac
echo "passed: $case_name"
