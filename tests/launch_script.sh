#!/usr/bin/env bash
# scripts/launch.sh does what it says it does as torchrun does, with stand-in ranks (no LibTorch):
#   tests/launch_script.sh <launch.sh>
# the variables each rank gets, the prefixed output, the first failing rank's exit status, SIGTERM
# to the others then SIGKILL after the grace period, and SIGINT/SIGTERM passed on to every rank.
set -uo pipefail
launch=$1
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-launch-XXXXXX")
trap 'pkill -KILL -f "$work/rank.sh" 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/script_support.sh"

# A stand-in rank: argument number RANK+1 says what rank RANK does.
#   exit:N      exits N after 0.3 s          late:N    on SIGTERM, exits N 0.3 s later
#   stubborn    ignores SIGTERM              wait      exits 128+signal on SIGINT or SIGTERM
#   slow-stop   on SIGINT, exits 130 1.5 s later (a rank saving its checkpoint)
# Each signal a rank gets is recorded in $work/<signal>-<rank>.
cat > "$work/rank.sh" <<'EOF'
#!/usr/bin/env bash
echo "rank $RANK of $WORLD_SIZE, local $LOCAL_RANK of $LOCAL_WORLD_SIZE, at $MASTER_ADDR:$MASTER_PORT"
echo "to stderr" >&2
mode=${*:$((RANK + 1)):1}
record() { touch "$(dirname "$0")/$1-$RANK"; }
case $mode in
  exit:*) sleep 0.3; exit "${mode#exit:}" ;;
  late:*) trap 'record TERM; sleep 0.3; exit '"${mode#late:}" TERM ;;
  stubborn) trap 'record TERM' TERM ;;
  wait) trap 'record INT; exit 130' INT; trap 'record TERM; exit 143' TERM ;;
  slow-stop) trap 'record INT; sleep 1.5; exit 130' INT; trap 'record TERM; exit 143' TERM ;;
esac
while :; do sleep 0.05; done
EOF
chmod +x "$work/rank.sh"

# run <name> [launch.sh options and arguments]: runs in the background; sets pid.
run() {
  local name=$1
  shift
  set -m  # a background job of a script would otherwise start with SIGINT ignored
  "$launch" "$@" > "$work/$name.out" 2>&1 &
  pid=$!
  set +m
}
# finish <name> <expected status> <at most seconds>: waits for the launcher started by run.
finish() {
  local start=$SECONDS status
  wait "$pid"
  status=$?
  [ "$status" -eq "$2" ] || { cat "$work/$1.out"; fail "$1: exit status $status, not $2"; }
  ((SECONDS - start <= $3)) || { cat "$work/$1.out"; fail "$1: took $((SECONDS - start)) s"; }
}
no_rank_left() {
  ! pgrep -f "$work/rank.sh" > /dev/null || fail "$1: a rank is still running"
}

# torchrun's variables, and every line prefixed with its rank.
run variables --master-port 29999 3 "$work/rank.sh" exit:0 exit:0 exit:0
finish variables 0 10
expect_in "$work/variables.out" "[rank 0] rank 0 of 3, local 0 of 3, at 127.0.0.1:29999"
expect_in "$work/variables.out" "[rank 2] rank 2 of 3, local 2 of 3, at 127.0.0.1:29999"
expect_in "$work/variables.out" "[rank 1] to stderr"
run node --nnodes 2 --node-rank 1 --master-addr 10.1.2.3 2 "$work/rank.sh" x x exit:0 exit:0
finish node 0 10
expect_in "$work/node.out" "[rank 2] rank 2 of 4, local 0 of 2, at 10.1.2.3:29500"
expect_in "$work/node.out" "[rank 3] rank 3 of 4, local 1 of 2, at 10.1.2.3:29500"

# The first failing rank's status; the others get SIGTERM at once and stop in their own time.
run first-failure --grace 20 3 "$work/rank.sh" late:5 exit:3 late:0
finish first-failure 3 10
[ -e "$work/TERM-0" ] && [ -e "$work/TERM-2" ] || fail "first-failure: the others got no SIGTERM"
expect_in "$work/first-failure.out" "a rank failed (exit status 3)"
no_rank_left first-failure

# A rank that ignores SIGTERM is killed after the grace period, not before.
rm -f "$work"/TERM-*
start_us=${EPOCHREALTIME//[.,]/}
run grace --grace 2 2 "$work/rank.sh" stubborn exit:4
finish grace 4 10
((${EPOCHREALTIME//[.,]/} - start_us >= 2300000)) ||  # exit:4 ends 0.3 s after the start
  fail "grace: the stubborn rank was killed before the grace period"
[ -e "$work/TERM-0" ] || fail "grace: the stubborn rank got no SIGTERM first"
no_rank_left grace

# SIGINT and SIGTERM to the launcher reach every rank; the status is theirs.
for signal in INT:130 TERM:143; do
  expected=${signal#*:} signal=${signal%:*}
  rm -f "$work"/INT-* "$work"/TERM-*
  run "signal-$signal" 2 "$work/rank.sh" wait wait
  sleep 1
  kill -s "$signal" "$pid"
  finish "signal-$signal" "$expected" 10
  [ -e "$work/$signal-0" ] && [ -e "$work/$signal-1" ] || fail "$signal did not reach every rank"
  no_rank_left "signal-$signal"
done
# While the ranks stop on a signal passed on, one that ends first does not set off SIGTERM (a
# second signal would terminate a rank still saving).
rm -f "$work"/INT-* "$work"/TERM-*
run stopping 2 "$work/rank.sh" wait slow-stop
sleep 1
kill -INT "$pid"
finish stopping 130 10
[ -e "$work/INT-1" ] || fail "stopping: rank 1 got no SIGINT"
[ ! -e "$work/TERM-1" ] || fail "stopping: rank 1 got SIGTERM while it stopped on SIGINT"
no_rank_left stopping
echo "passed"
