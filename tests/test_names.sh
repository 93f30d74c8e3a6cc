#!/usr/bin/env bash
# tests/test_names.sh <Catch2 test program>: fails when a test's name holds a ';'. ctest's
# catch_discover_tests splits a name at ';' into two cases that match no test, and those pass
# without running anything.
set -uo pipefail
names=$("$1" --list-test-names-only 2> /dev/null || "$1" --list-tests --verbosity quiet)
[ -n "$names" ] || { echo "FAILED: $1 listed no test names"; exit 1; }
if printf '%s\n' "$names" | grep -F ';'; then
  echo "FAILED: the names above hold a ';'"
  exit 1
fi
echo "$(printf '%s\n' "$names" | wc -l) names, none with a ';'"
