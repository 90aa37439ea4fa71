#!/usr/bin/env bash
# Reruns named mutants of a finished tools/mutation_python.sh pass against the current tests,
# each the way mutmut runs it (MUTANT_UNDER_TEST=<name> pytest in mutmut's copy), but with the
# whole of the given test files: mutmut runs only the tests it saw reach the function (a module
# fixture's calls count for the first test only), and functions called at import time cannot be
# checked by mutmut at all. The unmutated copy must pass the tests first (else nothing runs).
#
#   tools/mutation_rerun.sh cli/train "tests/test_cli_train.py" dsmoe.cli.train.x__train__mutmut_12 ...
#   tools/mutation_rerun.sh cli/train "tests/test_cli_runs.py -k resume" $(cat names.txt)
#
# Processes the tests start (the torchrun ranks of tests/test_distributed*.py) inherit
# MUTANT_UNDER_TEST and PYTHONPATH, so they run the mutant too.
# Prints "<name>: killed (<first failure>)" or "<name>: survived" per mutant. The tests are
# copied into the pass's scratch copy first (the pass copied them when it started).
set -euo pipefail
cd "$(dirname "$0")/.."
mod=${1:?usage: tools/mutation_rerun.sh MODULE "PYTEST ARGS" MUTANT...}
args=${2:?usage: tools/mutation_rerun.sh MODULE "PYTEST ARGS" MUTANT...}
shift 2
work=build/mutation/${mod//\//_}/mutants
[ -d "$work" ] || { echo "no pass of $mod in $work: run tools/mutation_python.sh $mod first" >&2; exit 2; }
if [ "${KEEP_TESTS:-0}" != 1 ]; then
  rm -rf "$work/tests" && cp -a tests "$work/tests"
fi
cd "$work"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# the copy as it stands must pass unmutated: a stale module in it (one changed since the pass
# started) would fail every mutant and count it killed
# shellcheck disable=SC2086
if ! timeout 1200 python -m pytest -x -q -p no:cacheprovider -m "not simt" $args > "$log" 2>&1; then
  echo "the tests fail on the unmutated copy in $work (a module changed since the pass started?):" >&2
  grep -m3 -E '^FAILED|^ERROR' "$log" >&2 || tail -5 "$log" >&2
  echo "refresh it: RESUME=1 tools/mutation_python.sh $mod, or copy the changed files into $work/dsmoe" >&2
  exit 3
fi
for name in "$@"; do
  # shellcheck disable=SC2086  # the pytest arguments are words
  if MUTANT_UNDER_TEST=$name timeout 600 python -m pytest -x -q -p no:cacheprovider -m "not simt" $args > "$log" 2>&1; then
    echo "$name: survived"
  else
    echo "$name: killed ($(grep -m1 -E '^FAILED|^ERROR' "$log" | cut -c1-120))"
  fi
done
