# Sourced by the end-to-end test scripts: what each of them reports with.
fail() { echo "FAILED: $*"; exit 1; }
expect_in() {  # expect_in <file> <text>
  grep -qF -- "$2" "$1" || { echo "--- $1"; cat "$1"; fail "'$2' not in $1"; }
}
# The Python that the interop tests run (scripts/setup.sh --torch2's venv, or $TORCHGUARD_PYTHON)
# when it imports $1 (a module); without one, prints the SKIPPED line and fails:
#   python=$(interop_python safetensors) || { echo "$python"; exit 0; }
interop_python() {  # interop_python <module>
  local python
  for python in "${TORCHGUARD_PYTHON:-}" "${TORCHGUARD_TORCH2_VENV:-/opt/torchguard-venv}/bin/python"; do
    [ -n "$python" ] && [ -x "$python" ] && "$python" -c "import $1" 2>/dev/null &&
      { echo "$python"; return 0; }
  done
  echo "SKIPPED: no Python with $1 (scripts/setup.sh --torch2 installs it)"
  return 1
}
