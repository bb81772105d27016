#!/usr/bin/env bash
# Run pytest for one tox env on the test files its path globs select, keeping a copy of the
# output for scripts/test-summary.sh.
#
# Usage (from the repository root, as tox runs it):
#   scripts/pytest.sh [--log FILE] [--exclude DIR]... PATH_OR_GLOB... [-- PYTEST_ARGS...]
#
# Under tox the log defaults to $TOX_WORK_DIR/reports/$TOX_ENV_NAME.log (tox sets both).
# pytest runs with -p no:cacheprovider: several envs run side by side in one tree and none
# needs .pytest_cache.
#
# Globs are bash globs with globstar ('tests/**/test_*sql*.py'); paths that do not exist
# are dropped. If nothing at all is left, the env has no tests in this tree yet (for example,
# the SQL tests before they land): that is said plainly and the env passes, because there is
# nothing it could have run. If files were found but pytest collects no test (exit 5), that is
# a failure: a selection that silently runs nothing must not look green.
set -euo pipefail
shopt -s nullglob globstar

log=""
if [[ -n ${TOX_ENV_NAME:-} && -n ${TOX_WORK_DIR:-} ]]; then
    log=$TOX_WORK_DIR/reports/$TOX_ENV_NAME.log
fi
if [[ ${1:-} == --log ]]; then
    log=$2
    shift 2
fi
# --exclude DIR (repeatable): drop expanded paths under DIR. pytest's --ignore-glob does not
# reliably drop files named on the command line (not under xdist), so exclude them here.
excludes=()
while [[ ${1:-} == --exclude ]]; do
    excludes+=("${2%/}/")
    shift 2
done

patterns=()
paths=()
while (( $# )) && [[ $1 != -- ]]; do
    patterns+=("$1")
    # Unquoted on purpose: this is where the glob expands.
    # shellcheck disable=SC2206
    matches=($1)
    for path in "${matches[@]}"; do
        [[ -e $path ]] || continue
        for ex in "${excludes[@]}"; do
            [[ $path == "$ex"* ]] && continue 2
        done
        paths+=("$path")
    done
    shift
done
[[ ${1:-} == -- ]] && shift

say() {
    printf '%s\n' "$*"
    if [[ -n $log ]]; then printf '%s\n' "$*" >>"$log"; fi
}

if [[ -n $log ]]; then
    mkdir -p "$(dirname "$log")"
    : >"$log"
fi

if (( ${#paths[@]} == 0 )); then
    say "pytest.sh: no test files match ${patterns[*]} in this tree: nothing to run for this env"
    exit 0
fi

if [[ -z $log ]]; then
    exec python -m pytest -p no:cacheprovider "${paths[@]}" "$@"
fi
set +e
python -m pytest -p no:cacheprovider "${paths[@]}" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
if (( status == 5 )); then
    say "pytest.sh: ${paths[*]} exist but pytest collected no test (exit 5): failing the env"
fi
exit "$status"
