# Sourced by the end-to-end test scripts: what each of them reports with.
fail() { echo "FAILED: $*"; exit 1; }
expect_in() {  # expect_in <file> <text>
  grep -qF -- "$2" "$1" || { echo "--- $1"; cat "$1"; fail "'$2' not in $1"; }
}
