#!/usr/bin/env bash
# The GAN example (two models, two optimizers, one CheckpointGuard) interrupted, end to end:
#   tests/train_gan.sh <train_gan binary> <case> [<io_faults shim>]
#   sigint        SIGINT midway: exit 130, the log ends "stopped at step N by SIGINT"; the same
#                 command resumes and ends bitwise equal to a run never interrupted, with the same
#                 losses in metrics.jsonl; once more: "the run is complete", nothing written
#   sigkill       kill -9 at three random-ish steps of one run, resumed each time: bitwise equal
#   kill-in-save  the process killed at every point of the second checkpoint's commit (its first
#                 write, each fsync, before the rename, after it): never a half-written ckpt-*,
#                 and every resume ends bitwise equal (needs the io_faults shim)
#   io-errors     a last save that fails, and a train.log that cannot be written: exit status 1
#                 with the error (a rerun resumes from the last good checkpoint); needs the shim
#   settings      another --batch-size or --threads is refused, naming both values, and writes
#                 nothing; another --lr resumes with a warning and is recorded
#   restore       --restore <step> resumes from that older checkpoint; a damaged newest one falls
#                 back; all damaged: exit 1, naming --restore none, which then starts fresh
# Each compares with a reference run of its own: 60 steps over the first 1000 images of
# Fashion-MNIST (32 steps an epoch, the last batch of 8: the runs cross an epoch), a checkpoint
# every 10 steps.
set -uo pipefail
binary=$1
case_name=$2
shim=${3:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-gan-XXXXXX")
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/script_support.sh"

# OpenBLAS's own threads spin in sched_yield between the small matrix products of one intra-op
# thread; on a 2-core machine that doubles a step's time. The arithmetic is the same either way.
export OPENBLAS_NUM_THREADS=1

# The first 1000 training images and labels, as gzipped idx files like the originals.
dataset=/usr/share/datasets/fashion-mnist
images=1000
be32() { printf "\\x$(printf %02x $(($1 >> 24 & 255)))\\x$(printf %02x $(($1 >> 16 & 255)))\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 & 255)))"; }
mkdir "$work/data"
[ -r "$dataset/train-images-idx3-ubyte.gz" ] ||
  fail "no $dataset/train-images-idx3-ubyte.gz (scripts/setup.sh installs dataset-fashion-mnist)"
{ printf '\x00\x00\x08\x03'; be32 $images; be32 28; be32 28
  gunzip -c "$dataset/train-images-idx3-ubyte.gz" | tail -c +17 | head -c $((images * 784)); } |
  gzip -1 > "$work/data/train-images-idx3-ubyte.gz"
{ printf '\x00\x00\x08\x01'; be32 $images
  gunzip -c "$dataset/train-labels-idx1-ubyte.gz" | tail -c +9 | head -c $images; } |
  gzip -1 > "$work/data/train-labels-idx1-ubyte.gz"

steps=60
common=(--data-dir "$work/data" --seed 1 --checkpoint-every 10 --log-every 1)
# Flags a run may give otherwise (CLI11 refuses a flag given twice).
defaults=(--threads 1 --batch-size 32 --max-steps "$steps")

# command_line <run name> [flags...]: the example's command line for $work/<run name>, in
# $command_line.
command_line() {
  local name=$1 i
  shift
  command_line=("$binary" "${common[@]}" --run-dir "$work/$name" "$@")
  for ((i = 0; i < ${#defaults[@]}; i += 2)); do
    [[ " $* " == *" ${defaults[i]} "* ]] || command_line+=("${defaults[i]}" "${defaults[i + 1]}")
  done
}
# gan <run name> [flags...]: runs the example on $work/<run name> in the foreground; output in
# $work/<run name>.out (appended: one file tells a run directory's whole story). Bash's "Killed"
# report of a killed run is left out.
gan() {
  command_line "$@"
  { "${command_line[@]}" >> "$work/$1.out" 2>&1; } 2> /dev/null
}
# gan_ok: the same, which must exit 0.
gan_ok() {
  gan "$@"
  local status=$?
  [ "$status" -eq 0 ] || { cat "$work/$1.out"; fail "run $* exited $status"; }
}
# The last `parameters` line of a run's output; a run prints exactly one.
fingerprint() { sed -n 's/^parameters \([0-9a-f]\{16\}\)$/\1/p' "$1" | tail -1; }
# The losses of a run directory's metrics.jsonl, without the times.
figures() { sed -E 's/"elapsed_s":[^,}]*,?//' "$1/metrics.jsonl"; }
# same_as_reference <run name>: ended at the reference's parameters, with its losses.
same_as_reference() {
  local got
  got=$(fingerprint "$work/$1.out")
  [ "$got" = "$reference" ] || { cat "$work/$1.out"; fail "$1 ended at parameters '$got', the reference at $reference"; }
  [ "$(figures "$work/$1")" = "$(figures "$work/reference")" ] || {
    diff <(figures "$work/reference") <(figures "$work/$1")
    fail "$1's metrics.jsonl differs from the reference's"
  }
}
# No ckpt-* directory without a manifest: a commit is whole or absent.
whole_checkpoints() {  # whole_checkpoints <run name> <when>
  local dir
  for dir in "$work/$1/checkpoints"/ckpt-*; do
    [ -e "$dir" ] || continue
    [ -f "$dir/manifest.json" ] || { ls -la "$dir"; fail "$2: $dir has no manifest"; }
  done
}
# Every file of a directory with its checksum (.lock names the last run's pid: not data).
checksums() { (cd "$1" && find . -type f ! -name .lock | sort | xargs md5sum); }
# The rows metrics.jsonl holds: with --log-every 1, the step the run has logged.
rows() { { wc -l < "$1/metrics.jsonl"; } 2> /dev/null || echo 0; }
# start <run name> [flags...]: the run in the background ($pid), with SIGINT's default action: a
# script's background job starts with SIGINT ignored, and so does everything under a script
# that was itself started in the background (the program leaves an ignored SIGINT ignored).
start() {
  command_line "$@"
  env --default-signal=INT "${command_line[@]}" >> "$work/$1.out" 2>&1 &
  pid=$!
}
# wait_rows <run name> <rows>: until metrics.jsonl has that many rows (or the run ended).
wait_rows() {
  for _ in $(seq 1200); do
    [ "$(rows "$work/$1")" -ge "$2" ] && return 0
    kill -0 "$pid" 2> /dev/null || return 0
    sleep 0.02
  done
  fail "$1: no row $2 in metrics.jsonl after 24 s"
}

gan_ok reference
expect_in "$work/reference.out" "Training complete at step $steps"
[ "$(grep -c '^parameters ' "$work/reference.out")" -eq 1 ] || fail "not one 'parameters' line"
reference=$(fingerprint "$work/reference.out")
[ -n "$reference" ] || fail "no parameters in the reference's output"

case "$case_name" in
  sigint)
    # A third of the way: the rest of the run leaves the signal time to arrive before its end.
    start interrupted
    wait_rows interrupted $((steps / 3))
    interrupt_run "$pid" "$work/interrupted.out"
    step=$interrupted_step
    if [ "$step" -lt $((steps / 3)) ] || [ "$step" -ge "$steps" ]; then
      cat "$work/interrupted.out"
      fail "interrupted at step '$step', not after step $((steps / 3)) and before $steps"
    fi
    tail -1 "$work/interrupted/train.log" | grep -qF "stopped at step $step by SIGINT" ||
      { cat "$work/interrupted/train.log"; fail "train.log does not end 'stopped at step $step by SIGINT'"; }
    if grep -qF "completed successfully" "$work/interrupted/train.log"; then
      fail "the interrupted run's train.log says 'completed successfully'"
    fi
    whole_checkpoints interrupted "after SIGINT"

    gan_ok interrupted  # the same command
    expect_in "$work/interrupted.out" "resumed from step $step "
    expect_in "$work/interrupted.out" "Training complete at step $steps"
    same_as_reference interrupted

    before=$(checksums "$work/interrupted/checkpoints")
    gan_ok interrupted  # once more: nothing left to train
    expect_in "$work/interrupted.out" "the run is complete at step $steps; nothing to train"
    [ "$(checksums "$work/interrupted/checkpoints")" = "$before" ] ||
      fail "the run that was already complete changed its checkpoints"
    [ "$(fingerprint "$work/interrupted.out")" = "$reference" ] ||
      fail "the complete run reports other parameters"
    echo "interrupted at step $step of $steps, resumed: parameters $reference as uninterrupted"
    ;;
  sigkill)
    # Three points, drawn anew each time from steps 12-19, 22-29 and 32-39 (printed: a failure
    # names them; the first checkpoint is at 10, and the rest of the run leaves time for the kill
    # to land before its end), each past the step the kill before reached: the resumed run trains
    # again before it is killed.
    kills=()
    reached_steps=()
    reached=0
    for tens in 1 2 3; do
      point=$((tens * 10 + 2 + RANDOM % 8))
      [ "$point" -gt "$reached" ] || point=$((reached + 1 + RANDOM % 3))
      kills+=("$point")
      start killed
      wait_rows killed "$point"
      kill -KILL "$pid"
      { wait "$pid"; } 2> /dev/null
      status=$?
      [ "$status" -eq 137 ] ||
        { cat "$work/killed.out"; fail "the run to kill after step $point exited $status first"; }
      whole_checkpoints killed "killed after step $point"
      reached=$(rows "$work/killed")
      reached_steps+=("$reached")
    done
    gan_ok killed
    expect_in "$work/killed.out" "Training complete at step $steps"
    resumes=$(grep -c "CheckpointGuard: resumed from step" "$work/killed.out")
    [ "$resumes" -eq 3 ] || { cat "$work/killed.out"; fail "$resumes resumes after 3 kills, not 3"; }
    same_as_reference killed
    echo "killed after steps ${reached_steps[*]} (waited for ${kills[*]}), resumed $resumes" \
      "times: parameters $reference as uninterrupted"
    ;;
  kill-in-save)
    if [ -z "$shim" ] || [ ! -f "$shim" ]; then
      fail "kill-in-save needs the io_faults shim (argument 3)"
    fi
    second="ckpt-000002-step-20"
    tried=0
    # killed_run <name> <rule>: the run under the shim; its exit status.
    killed_run() { TORCHGUARD_FAULTS="$2" LD_PRELOAD="$shim" gan "$1"; }
    # resumed_after <name> <rule> <newest checkpoint> <resumed step> <status>: the run was killed
    # where the rule says and left that newest checkpoint, each ckpt-* whole; the same command
    # resumes from the step and ends as the reference did.
    resumed_after() {
      local name=$1 rule=$2 newest=$3 resumed=$4 status=$5 last
      [ "$status" -eq 137 ] || { cat "$work/$name.out"; fail "$name ($rule): exit $status, not killed"; }
      expect_in "$work/$name.out" "-> SIGKILL"
      whole_checkpoints "$name" "killed at $rule"
      last=$(cd "$work/$name/checkpoints" && ls -d ckpt-* | sort | tail -1)
      [ "$last" = "$newest" ] || fail "killed at $rule: the newest checkpoint is $last, not $newest"
      gan_ok "$name"
      expect_in "$work/$name.out" "resumed from step $resumed "
      if [ "$newest" = ckpt-000001-step-10 ]; then
        expect_in "$work/$name.out" "left by an interrupted save"
      fi
      whole_checkpoints "$name" "resumed after $rule"
      if compgen -G "$work/$name/checkpoints/.tmp-*" > /dev/null; then
        fail "resumed after $rule: a temporary is left"
      fi
      same_as_reference "$name"
      tried=$((tried + 1))
    }
    kill_at() {  # kill_at <name> <rule> <newest checkpoint> <resumed step>
      killed_run "$1" "$2"
      resumed_after "$@" $?
    }
    # The commit's first write: its temporary directory holds nothing whole yet.
    kill_at first-write "write:$second:KILL:0:1" ckpt-000001-step-10 10
    # Each fsync of the commit: of each file once it is written, of the manifest, of the
    # temporary directory. Counted until the rule no longer fires: that run ends uninterrupted,
    # with the shim loaded.
    fsyncs=0
    while :; do
      rule="fsync:$second:KILL:$fsyncs:1"
      killed_run "fsync-$fsyncs" "$rule"
      status=$?
      if [ "$status" -eq 0 ]; then
        grep -q "io_faults:" "$work/fsync-$fsyncs.out" && fail "$rule fired, yet the run ended"
        same_as_reference "fsync-$fsyncs"
        break
      fi
      resumed_after "fsync-$fsyncs" "$rule" ckpt-000001-step-10 10 "$status"
      fsyncs=$((fsyncs + 1))
      [ "$fsyncs" -le 20 ] || fail "more than 20 fsyncs in one commit"
    done
    files=$(ls "$work/reference/checkpoints/ckpt-000006-step-60" | wc -l)
    [ "$fsyncs" -eq $((files + 1)) ] ||
      fail "$fsyncs fsyncs in the commit of $files files: each file and the directory, expected"
    # Before the rename: the manifest is durable, the directory still a temporary.
    kill_at rename "rename:$second:KILL:0:1" ckpt-000001-step-10 10
    # After it, at the fsync of the checkpoints directory (the first commit's was the first).
    kill_at after-rename "fsync:checkpoints\$:KILL:1:1" "$second" 20
    echo "killed at $tried points of the commit of $second ($files files, $fsyncs fsyncs):" \
      "each resumed to parameters $reference as uninterrupted"
    ;;
  io-errors)
    [ -f "$shim" ] || fail "io-errors needs the io_faults shim (argument 3)"
    # The last save fails (EIO at its first fsync): exit 1 with the error, not a quiet 0; the
    # checkpoints before it stay, and the same command resumes from them to the reference's end.
    TORCHGUARD_FAULTS="fsync:ckpt-000006-step-60:EIO:0:1" LD_PRELOAD="$shim" gan failed-save
    status=$?
    [ "$status" -eq 1 ] || { cat "$work/failed-save.out"; fail "a failed last save exited $status, not 1"; }
    expect_in "$work/failed-save.out" "error: CheckpointGuard: cannot save the checkpoint of step $steps"
    expect_in "$work/failed-save/train.log" "Training session 'dcgan' failed at step $steps"
    grep -q "^parameters" "$work/failed-save.out" && fail "a run whose last save failed reported parameters"
    whole_checkpoints failed-save "after the failed save"
    gan_ok failed-save
    expect_in "$work/failed-save.out" "resumed from step 50 "
    same_as_reference failed-save
    # train.log cannot be written at the end: exit 1, naming the file.
    TORCHGUARD_FAULTS="write:train.log\$:EIO" LD_PRELOAD="$shim" gan failed-log --max-steps 10
    status=$?
    [ "$status" -eq 1 ] || { cat "$work/failed-log.out"; fail "a log that cannot be written exited $status, not 1"; }
    expect_in "$work/failed-log.out" "error: cannot write the log file '$work/failed-log/train.log'"
    ;;
  settings)
    gan_ok run --max-steps 20
    expect_in "$work/run.out" "Training complete at step 20"
    before=$(checksums "$work/run/checkpoints")
    metrics=$(cat "$work/run/metrics.jsonl")
    for change in "--batch-size 16:--batch-size is 16 in this run but was 32" \
                  "--threads 2:--threads is 2 in this run but was 1"; do
      flags=${change%%:*}
      message=${change#*:}
      # shellcheck disable=SC2086  # two words: the flag and its value
      gan run $flags && { cat "$work/run.out"; fail "$flags was accepted"; }
      expect_in "$work/run.out" "error: CheckpointGuard: $message"
      [ "$(checksums "$work/run/checkpoints")" = "$before" ] || fail "the run with $flags changed the checkpoints"
      [ "$(cat "$work/run/metrics.jsonl")" = "$metrics" ] || fail "the run with $flags changed metrics.jsonl"
    done
    gan_ok run --lr 0.0001
    expect_in "$work/run.out" "resumed from step 20 "
    expect_in "$work/run.out" "--lr changed from 0.0002 to 0.0001"
    expect_in "$work/run.out" "Training complete at step $steps"
    newest=$(ls -d "$work/run/checkpoints"/ckpt-* | sort | tail -1)
    grep -Eq '"--lr": ?0.0001' "$newest/manifest.json" || fail "the new --lr is not in $newest"
    [ "$(fingerprint "$work/run.out")" != "$reference" ] || fail "--lr 0.0001 changed nothing"
    ;;
  restore)
    # Retention kept the reference's newest three: steps 40, 50 and 60 (complete).
    cp -a "$work/reference" "$work/older"
    gan older --restore 25 && fail "--restore 25 (no such checkpoint) was accepted"
    expect_in "$work/older.out" "no checkpoint '25'"
    gan_ok older --restore 40
    expect_in "$work/older.out" "resumed from step 40 "
    expect_in "$work/older.out" "restoring 'ckpt-000004-step-40' as asked, though 2 newer"
    same_as_reference older

    # A flipped byte in the newest checkpoint: quarantined, the one before it restored.
    flip() {  # flip <file>: one byte in the middle changed
      local offset byte
      offset=$(($(stat -c %s "$1") / 2))
      byte=$(od -An -tu1 -j "$offset" -N1 "$1" | tr -d ' ')
      printf "$(printf '\\%03o' $(((byte + 1) % 256)))" |
        dd of="$1" bs=1 seek="$offset" conv=notrunc status=none
    }
    cp -a "$work/reference" "$work/damaged"
    flip "$work/damaged/checkpoints/ckpt-000006-step-60/model.generator.safetensors"
    gan_ok damaged
    expect_in "$work/damaged.out" "model.generator.safetensors fails its checksum"
    expect_in "$work/damaged.out" "resumed from step 50 "
    [ -d "$work/damaged/checkpoints/quarantine/ckpt-000006-step-60" ] || fail "nothing quarantined"
    same_as_reference damaged

    # Every checkpoint damaged: refused, naming the flag that starts fresh; which then does.
    cp -a "$work/reference" "$work/ruined"
    for dir in "$work/ruined/checkpoints"/ckpt-*; do flip "$dir/optimizer.discriminator.safetensors"; done
    gan ruined && { cat "$work/ruined.out"; fail "a run whose checkpoints are all damaged started"; }
    expect_in "$work/ruined.out" "error: CheckpointGuard: no valid checkpoint"
    expect_in "$work/ruined.out" "pass --restore none to start fresh"
    grep -q "^parameters" "$work/ruined.out" && fail "the refused run trained"
    gan ruined && { cat "$work/ruined.out"; fail "the quarantined checkpoints were forgotten"; }
    gan_ok ruined --restore none
    expect_in "$work/ruined.out" "starting fresh (restore = \"none\")"
    same_as_reference ruined
    ;;
  *)
    fail "unknown case '$case_name'"
    ;;
esac
echo "passed: $case_name"
