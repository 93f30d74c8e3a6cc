#!/usr/bin/env bash
# The data-parallel demo under PyTorch's own launcher: the torchrun of the torch wheel that
# scripts/setup.sh --torch2 installs (skipped, visibly, without it).
#   tests/torchrun.sh <train_distributed binary> torch2
#     built on LibTorch 2.x: two ranks train and a second launch resumes; with --max_restarts=1 a
#     rank killed with SIGKILL is restarted with the others from the last checkpoint, and the run
#     ends with the parameters of a run never killed; two agents on this machine act as two nodes
#     (c10d rendezvous) and train together to the same parameters again.
#   tests/torchrun.sh <train_distributed binary> libtorch1
#     built on LibTorch before 2.1: under torchrun's agent store the ranks fail within their
#     timeout with a message that names the cause; the remedy it gives (a store of the ranks' own)
#     trains.
set -uo pipefail
binary=$1
case_name=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-torchrun-XXXXXX")
trap 'pkill -KILL -f "$work/" 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/script_support.sh"
python=$(interop_python torch.distributed.run) || { echo "$python"; exit 0; }
torchrun=$(dirname "$python")/torchrun
[ -x "$torchrun" ] || torchrun=("$python" -m torch.distributed.run)
# The same arithmetic in every run: one intra-op thread, the same global batch (2 x 32). The
# parameters are compared, not the accuracy.
demo=(--no_python "$binary" --checkpoint-every 40 --threads 1 --log-every 40 --no-evaluate)

# The parameters rank 0 reports at the end, which every rank checked it has too.
fingerprint() {
  sed -n 's/.*parameters \([0-9a-f]\{16\}\) on every rank.*/\1/p' "$@" | head -1
}
free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# The pid of the given rank of the first attempt, among the processes of a run directory.
pid_of_rank() {  # pid_of_rank <rank> <run dir>
  local pid
  for pid in $(pgrep -f -- "--run-dir $2 "); do
    [ "$(readlink "/proc/$pid/exe")" = "$(readlink -f "$binary")" ] || continue
    tr '\0' '\n' < "/proc/$pid/environ" 2> /dev/null | grep -qx "RANK=$1" || continue
    tr '\0' '\n' < "/proc/$pid/environ" 2> /dev/null | grep -qx "TORCHELASTIC_RESTART_COUNT=0" &&
      { echo "$pid"; return 0; }
  done
  return 1
}

case "$case_name" in
torch2)
  # 1. Two ranks train 80 steps; the same command with --max-steps 160 resumes and goes on.
  "${torchrun[@]}" --standalone --nproc_per_node=2 "${demo[@]}" --run-dir "$work/resume" \
    --max-steps 80 > "$work/first.out" 2>&1 || { cat "$work/first.out"; fail "the first launch failed"; }
  expect_in "$work/first.out" "2 ranks: 80 steps"
  "${torchrun[@]}" --standalone --nproc_per_node=2 "${demo[@]}" --run-dir "$work/resume" \
    --max-steps 160 > "$work/second.out" 2>&1 || { cat "$work/second.out"; fail "the second launch failed"; }
  expect_in "$work/second.out" "resumed from step 80 on 2 ranks"
  expect_in "$work/second.out" "2 ranks: 160 steps"
  resumed=$(fingerprint "$work/second.out")
  echo "two ranks, resumed at step 80: parameters $resumed"

  # 2. An elastic restart: rank 1 killed with SIGKILL after the first checkpoint; torchrun stops
  # rank 0 and starts both again, which resume from the last commit.
  set -m
  "${torchrun[@]}" --standalone --nproc_per_node=2 --max_restarts=1 \
    "${demo[@]}" --run-dir "$work/elastic" --max-steps 160 > "$work/elastic.out" 2>&1 &
  launcher=$!
  set +m
  for _ in $(seq 1200); do
    ls -d "$work/elastic/checkpoints"/ckpt-* > /dev/null 2>&1 && break
    sleep 0.05
  done
  victim=$(pid_of_rank 1 "$work/elastic") || { cat "$work/elastic.out"; fail "no rank 1 to kill"; }
  kill -KILL "$victim"
  killed_at=$SECONDS
  wait "$launcher"
  status=$?
  [ "$status" -eq 0 ] || { cat "$work/elastic.out"; fail "the elastic run exited $status"; }
  grep -q "resumed from step" "$work/elastic.out" || { cat "$work/elastic.out"; fail "the restart did not resume"; }
  expect_in "$work/elastic.out" "2 ranks: 160 steps"
  grep -h "resumed from step\|ProcessGroupGuard.*failed on rank 0" "$work/elastic.out" | head -3
  elastic=$(fingerprint "$work/elastic.out")
  echo "killed rank 1 (pid $victim), restarted: parameters $elastic, $((SECONDS - killed_at)) s after the kill"
  [ "$elastic" = "$resumed" ] || fail "the restarted run ended with $elastic, the run never killed with $resumed"

  # 3. Two agents as two nodes of one rank each, meeting through the c10d rendezvous.
  port=$(free_port)
  for node in 0 1; do
    "${torchrun[@]}" --nnodes=2 --node_rank=$node --nproc_per_node=1 --rdzv_backend=c10d \
      --rdzv_endpoint="127.0.0.1:$port" --rdzv_id="torchguard-$$" "${demo[@]}" \
      --run-dir "$work/nodes" --max-steps 160 > "$work/node-$node.out" 2>&1 &
    agents[$node]=$!
  done
  for node in 0 1; do
    wait "${agents[$node]}" || { cat "$work/node-$node.out"; fail "node $node failed"; }
  done
  grep -q "2 ranks: 160 steps" "$work/node-0.out" "$work/node-1.out" ||
    { cat "$work"/node-*.out; fail "the two nodes did not finish"; }
  nodes=$(fingerprint "$work"/node-*.out)
  echo "two nodes: parameters $nodes"
  [ "$nodes" = "$resumed" ] || fail "two nodes ended with $nodes, one node with two ranks with $resumed"
  ;;
libtorch1)
  # 1. torchrun's default (static) rendezvous: its agent serves the store the ranks use.
  start=$SECONDS
  "${torchrun[@]}" --nproc_per_node=2 --master_port="$(free_port)" "${demo[@]}" \
    --run-dir "$work/agent-store" --max-steps 40 --timeout 10 > "$work/agent-store.out" 2>&1
  status=$?
  elapsed=$((SECONDS - start))
  [ "$status" -ne 0 ] || { cat "$work/agent-store.out"; fail "the ranks did not fail"; }
  expect_in "$work/agent-store.out" "had no answer from the store at"
  expect_in "$work/agent-store.out" "a torchrun from torch 2.1 or later"
  # The timeout, its grace and torchrun's own start and stop.
  ((elapsed < 45)) || fail "the ranks failed after $elapsed s, with a timeout of 10 s"
  grep -h -m1 "had no answer" "$work/agent-store.out" | cut -c1-200
  echo "failed in $elapsed s with --timeout 10"
  # 2. The remedy the message names: the ranks' own store, through the c10d rendezvous.
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${torchrun[@]}" --standalone --nproc_per_node=2 \
    "${demo[@]}" --run-dir "$work/own-store" --max-steps 40 --timeout 30 > "$work/own-store.out" 2>&1 ||
    { cat "$work/own-store.out"; fail "the remedy failed"; }
  expect_in "$work/own-store.out" "2 ranks: 40 steps"
  ;;
*)
  fail "unknown case '$case_name' (torch2 or libtorch1)"
  ;;
esac
echo "passed"
