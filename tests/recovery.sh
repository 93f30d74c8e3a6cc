#!/usr/bin/env bash
# A run that heals itself (--recovery), end to end on the demos, with the fault injection
# (--poison-steps): tests/recovery.sh <train_fashion_mnist> <case> <io_faults shim>
#                                     [<launch.sh> <train_distributed>]
#   poisoned    the batch of step 70 is NaN (and, in a second run, its loss spikes 1000x): the run
#               goes back to step 50, skips the batch, completes, and ends bit for bit equal to a
#               clean run started with --skip-samples <that batch> (read from the checkpoint);
#               metrics.jsonl has the recovery's row
#   recurs      step 70 is bad whatever it draws: the run ends with the bounded error naming the
#               steps and the batch, saves nothing more, and the same command without the poison
#               resumes from the last good checkpoint and completes
#   killed      SIGKILL during the recovery's save (the resume recovers again), and after it (the
#               resume keeps the skip list and never sees the batch): both end equal to the clean
#               run with the batch skipped
#   distributed two ranks, rank 1's loss of step 45 spikes 1000x (rank 0's is normal): both go
#               back together, skip the same global batch, end with the same parameters, equal
#               to a clean two-rank run that skipped it
set -uo pipefail
binary=$1
case_name=$2
shim=${3:-}
launch=${4:-}
distributed=${5:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-recovery-XXXXXX")
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/script_support.sh"
common=(--threads 2 --no-plots --eval-samples 500 --log-every 10 --max-steps 120
        --checkpoint-every 50)

demo() {  # demo <name> <flags...>: a run in $work/<name>, its output in $work/<name>.out
  local name=$1
  shift
  "$binary" "${common[@]}" --run-dir "$work/$name" "$@" > "$work/$name.out" 2>&1
}
fingerprint() { cat "$1/parameters.xxh3"; }
# The skip list the newest checkpoint of a run directory keeps (its sampler's), comma-separated.
skip_list() {  # skip_list <checkpoints dir>
  python3 - "$1" <<'EOF'
import json, pathlib, sys
newest = sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.name.startswith("ckpt-"))[-1]
sampler = json.loads((newest / "manifest.json").read_text())["samplers"]
print(",".join(str(i) for i in next(iter(sampler.values()))["skip"]))
EOF
}
# The clean run: no poison, no recovery, the skipped samples left out from the start.
clean_fingerprint() {  # clean_fingerprint <skip list>
  demo clean --skip-samples "$1" || { cat "$work/clean.out"; fail "the clean run failed"; }
  fingerprint "$work/clean"
}

case "$case_name" in
  poisoned)
    demo nan --recovery --poison-steps 70 || { cat "$work/nan.out"; fail "the poisoned run failed"; }
    expect_in "$work/nan.out" "step 70 went wrong (the loss is nan): back to step 50"
    expect_in "$work/nan.out" "(64 samples); recovery 1 (1 of at most 3 within 1000 steps)"
    expect_in "$work/nan.out" "finished at step 120"
    expect_in "$work/nan/metrics.jsonl" '"recovery/bad_step":70'
    skip=$(skip_list "$work/nan/checkpoints")
    [ "$(tr ',' '\n' <<< "$skip" | wc -l)" -eq 64 ] || fail "the skip list is not one batch: $skip"
    demo spike --recovery --poison-steps 70 --poison-kind spike ||
      { cat "$work/spike.out"; fail "the spiking run failed"; }
    expect_in "$work/spike.out" "step 70 went wrong (the loss"
    expect_in "$work/spike.out" "x the median of the last 64"
    [ "$(skip_list "$work/spike/checkpoints")" = "$skip" ] || fail "the spike skipped another batch"
    clean=$(clean_fingerprint "$skip")
    echo "poisoned (nan):   $(fingerprint "$work/nan")"
    echo "poisoned (spike): $(fingerprint "$work/spike")"
    echo "clean, skipping:  $clean"
    [ "$(fingerprint "$work/nan")" = "$clean" ] || fail "the NaN run differs from the clean run"
    [ "$(fingerprint "$work/spike")" = "$clean" ] || fail "the spiking run differs from the clean run"
    ;;
  recurs)
    demo run --recovery --poison-steps 70 --poison-recurs && fail "the recurring poison was not stopped"
    expect_in "$work/run.out" "step 70 went wrong (the loss is nan) again after the run went back to step 50"
    expect_in "$work/run.out" "the fault is not in the batch"
    expect_in "$work/run.out" "step 70 (the loss is nan) -> back to step 50, skipped"
    newest=$(ls "$work/run/checkpoints" | grep '^ckpt-' | sort | tail -n 1)
    [ "$newest" = ckpt-000003-step-50 ] || fail "the newest checkpoint is $newest, not the recovery's"
    demo run --recovery || { cat "$work/run.out"; fail "the rerun without the poison failed"; }
    expect_in "$work/run.out" "resumed from step 50"
    expect_in "$work/run.out" "finished at step 120"
    ;;
  killed)
    [ -f "$shim" ] || fail "killed needs the io_faults shim (argument 3)"
    # Commits: step 0 (recovery on), step 50, the recovery's (step 50 again), step 100, 120.
    TORCHGUARD_FAULTS="rename:ckpt-000003-step-50:KILL:0:1" LD_PRELOAD=$shim \
      demo during --recovery --poison-steps 70
    expect_in "$work/during.out" "-> SIGKILL"
    demo during --recovery --poison-steps 70 || { cat "$work/during.out"; fail "the resume failed"; }
    expect_in "$work/during.out" "resumed from step 50"
    expect_in "$work/during.out" "step 70 went wrong"
    TORCHGUARD_FAULTS="rename:ckpt-000004-step-100:KILL:0:1" LD_PRELOAD=$shim \
      demo after --recovery --poison-steps 70
    expect_in "$work/after.out" "-> SIGKILL"
    expect_in "$work/after.out" "step 70 went wrong"
    demo after --recovery --poison-steps 70 || { cat "$work/after.out"; fail "the resume failed"; }
    expect_in "$work/after.out" "resumed from step 50 (ckpt-000003-step-50)"
    grep -q "went wrong" "$work/after.out" && fail "the resumed run met the skipped batch again"
    skip=$(skip_list "$work/after/checkpoints")
    [ "$(skip_list "$work/during/checkpoints")" = "$skip" ] || fail "the two resumes skipped differently"
    clean=$(clean_fingerprint "$skip")
    [ "$(fingerprint "$work/during")" = "$clean" ] || fail "killed during the recovery: differs"
    [ "$(fingerprint "$work/after")" = "$clean" ] || fail "killed after the recovery: differs"
    echo "killed during and after the recovery, resumed: $clean, as the clean run"
    ;;
  distributed)
    [ -x "$launch" ] && [ -x "$distributed" ] || fail "distributed needs launch.sh and the binary"
    two_ranks() {  # two_ranks <name> <flags...>
      local name=$1
      shift
      "$launch" 2 "$distributed" --run-dir "$work/$name" --max-steps 60 --checkpoint-every 20 \
        --log-every 10 --no-evaluate --timeout 60 "$@" > "$work/$name.out" 2>&1 ||
        { cat "$work/$name.out"; fail "the two-rank run $name failed"; }
    }
    two_ranks poisoned --recovery --poison-steps 45 --poison-kind spike --poison-rank 1
    expect_in "$work/poisoned/train-rank-1.log" "step 45 went wrong (the loss"
    expect_in "$work/poisoned/train-rank-0.log" \
      "step 45 went wrong (another process's step went wrong): back to step 40"
    expect_in "$work/poisoned.out" "2 ranks: 60 steps"
    skip=$(skip_list "$work/poisoned/checkpoints")
    [ "$(tr ',' '\n' <<< "$skip" | wc -l)" -eq 64 ] || fail "not the global batch: $skip"
    two_ranks clean --skip-samples "$skip"
    poisoned=$(grep -o "parameters [0-9a-f]* on every rank" "$work/poisoned.out")
    clean=$(grep -o "parameters [0-9a-f]* on every rank" "$work/clean.out")
    echo "poisoned: $poisoned; clean: $clean"
    [ -n "$poisoned" ] && [ "$poisoned" = "$clean" ] || fail "the ranks differ from the clean run"
    ;;
  *)
    fail "unknown case $case_name"
    ;;
esac
echo "passed"
