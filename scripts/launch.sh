#!/usr/bin/env bash
# Starts N processes of a program on this machine with torchrun's variables (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as
# `torchrun --nproc-per-node=N --no-python program args...` does.
#
#   scripts/launch.sh [options] N program [args...]
#     --nnodes K          machines in the job (default 1)
#     --node-rank R       this machine's index, 0 to K-1 (default 0)
#     --master-addr HOST  rank 0's machine (default 127.0.0.1)
#     --master-port PORT  default: a random free-looking port on one machine, 29500 on several
#     --grace SECONDS     after a rank fails, how long the others get to stop (default 30)
#
# For LibTorch before 2.1, whose store client cannot talk to the agent of a torchrun from torch
# 2.1 or later; with LibTorch 2.x, torchrun does this and more (restarts, several nodes' rendezvous).
# As torchrun does: each output line is prefixed with its rank; SIGINT and SIGTERM are passed on
# to every rank; when a rank fails, the others get SIGTERM, then SIGKILL after the grace period
# (unless the ranks are stopping on a signal passed on).
# The exit status is the first failing rank's (128+N for a rank killed by signal N), else 0.
set -uo pipefail
nnodes=1 node_rank=0 master_addr=127.0.0.1 master_port="" grace=30
while [[ $# -gt 0 && $1 == --* ]]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master-addr) master_addr=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    --grace) grace=$2; shift 2 ;;
    *) echo "launch.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ ! $grace =~ ^[0-9]+$ ]]; then
  echo "launch.sh: --grace takes whole seconds, not '$grace'" >&2
  exit 2
fi
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/launch.sh [options] N program [args...]   (N: processes on this machine)" >&2
  exit 2
fi
nproc=$1; shift
if [[ -z $master_port ]]; then
  if ((nnodes == 1)); then master_port=$((20000 + RANDOM % 30000)); else master_port=29500; fi
fi

pids=()
# Job control on while the ranks start: a background job of a script otherwise starts with SIGINT
# ignored, and a program that keeps an inherited ignored SIGINT ignored (as torchguard's
# TrainingSession does) would never see the SIGINT passed on below.
set -m
for ((local_rank = 0; local_rank < nproc; local_rank++)); do
  rank=$((node_rank * nproc + local_rank))
  RANK=$rank WORLD_SIZE=$((nnodes * nproc)) LOCAL_RANK=$local_rank LOCAL_WORLD_SIZE=$nproc \
    MASTER_ADDR=$master_addr MASTER_PORT=$master_port \
    "$@" > >(sed -u "s/^/[rank $rank] /") 2> >(sed -u "s/^/[rank $rank] /" >&2) &
  pids+=($!)
done
set +m

declare -A exit_of  # rank index -> exit status, once it has ended
forward() {  # to the ranks still running
  local i
  for i in "${!pids[@]}"; do
    [[ -z ${exit_of[$i]:-} ]] && kill -s "$1" "${pids[$i]}" 2>/dev/null
  done
  return 0
}
# A signal the user sends is passed on once; the ranks stop as they agree (a second signal would
# terminate them, so a rank's exit status after it does not set off the SIGTERM below).
interrupted=""
trap 'interrupted=1; forward INT' INT
trap 'interrupted=1; forward TERM' TERM

# A rank has ended when its process is gone or a zombie (not yet waited for).
ended() {
  local state=""
  [[ -r /proc/$1/stat ]] && read -r _ _ state _ < "/proc/$1/stat"
  [[ -z $state || $state == Z ]]
}

now_us() { echo "${EPOCHREALTIME//[.,]/}"; }  # microseconds, whatever the locale's decimal point
status=0 failed_at="" terminated=""
while :; do
  alive=0
  for i in "${!pids[@]}"; do
    [[ -n ${exit_of[$i]:-} ]] && continue
    if ! ended "${pids[$i]}"; then alive=$((alive + 1)); continue; fi
    wait "${pids[$i]}"
    code=$?
    exit_of[$i]=$code
    if ((code != 0 && status == 0)); then status=$code failed_at=$(now_us); fi
  done
  ((alive == 0)) && break
  [[ -n $interrupted ]] && { sleep 0.2; continue; }
  if [[ -n $failed_at && -z $terminated ]]; then
    echo "launch.sh: a rank failed (exit status $status); stopping the others (SIGTERM, then" \
         "SIGKILL after ${grace} s)" >&2
    forward TERM
    terminated=1
  fi
  if [[ -n $failed_at ]] && (($(now_us) - failed_at >= grace * 1000000)); then
    forward KILL
  fi
  sleep 0.2
done
wait  # the output filters
exit $status
