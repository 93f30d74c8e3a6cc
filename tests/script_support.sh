# Sourced by the end-to-end test scripts: what each of them reports with.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/venvs.sh"
fail() { echo "FAILED: $*"; exit 1; }
expect_in() {  # expect_in <file> <text>
  grep -qF -- "$2" "$1" || { echo "--- $1"; cat "$1"; fail "'$2' not in $1"; }
}
# The Python that the interop tests run (scripts/setup.sh --torch2's venv, or $TORCHGUARD_PYTHON)
# when it imports $1 (a module); without one, prints the SKIPPED line and fails:
#   python=$(interop_python safetensors) || { echo "$python"; exit 0; }
interop_python() {  # interop_python <module>
  local python
  for python in "${TORCHGUARD_PYTHON:-}" "$torch2_venv/bin/python"; do
    [ -n "$python" ] && [ -x "$python" ] && "$python" -c "import $1" 2>/dev/null &&
      { echo "$python"; return 0; }
  done
  echo "SKIPPED: no Python with $1 (scripts/setup.sh --torch2 installs it)"
  return 1
}
# The Python whose torch is the given LibTorch version's (major.minor: the same kernels), with the
# repository's python/ package on its path, as a command prefix: Debian's python3-torch (the venv
# scripts/setup.sh makes over it) for Debian's LibTorch, the torch2 venv for the wheel's. Without
# one, prints the SKIPPED line and fails:
#   python=$(libtorch_python 2.15.0 "torchguard, safetensors") || { echo "$python"; exit 0; }
libtorch_python() {  # libtorch_python <LibTorch version> <modules>
  local python version=${1%.*}.
  for python in "${TORCHGUARD_PYTHON:-}" "$debian_venv/bin/python" \
                "$torch2_venv/bin/python"; do
    [ -n "$python" ] && [ -x "$python" ] &&
      PYTHONPATH="$(dirname "${BASH_SOURCE[0]}")/../python" "$python" -c \
        "import torch, $2; assert torch.__version__.startswith('$version')" 2>/dev/null &&
      { echo "env PYTHONPATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../python" && pwd) $python"; return 0; }
  done
  echo "SKIPPED: no Python with torch ${version}x that imports $2 (scripts/setup.sh installs it)"
  return 1
}
# Interrupts a run started in the background (`pid`, its output in `file`) with SIGINT, waits for
# it, and checks that it stopped as an interrupted run does: exit status 130 and "interrupted at
# step N" in its output. Sets interrupted_step to N.
interrupt_run() {  # interrupt_run <pid> <output file>
  local status
  kill -INT "$1"
  { wait "$1"; } 2> /dev/null
  status=$?
  [ "$status" -eq 130 ] || { cat "$2"; fail "the interrupted run exited $status, not 130"; }
  interrupted_step=$(sed -n 's/.*interrupted at step \([0-9]*\).*/\1/p' "$2" | head -n 1)
  [ -n "$interrupted_step" ] || { cat "$2"; fail "no 'interrupted at step' in $2"; }
}
