#!/usr/bin/env bash
# Mutation testing of sqdf/core/ with mutmut (issue 39): every small change mutmut makes to
# the pure math (an operator, a constant, a sign) should fail some test of tests/core/ or of
# the training tests. Not part of CI: on 2 cores it takes hours; tests/test_mutants.py is the
# CI-sized guard. The score and its survivors are in docs/reliability.md.
#
#   bash scripts/mutation.sh [WORKDIR]     # default WORKDIR: a new temporary folder
#   MUTMUT_CHILDREN=4 bash scripts/mutation.sh   # parallel mutants (default 2)
#   MUTATION_TESTS="tests/core/" bash scripts/mutation.sh   # another test selection
#   MUTATION_MINUTES=30 bash scripts/mutation.sh  # stop after 30 minutes (SIGINT: mutmut
#                                                # keeps the verdicts it reached)
#
# It works in a copy of the committed tree (mutmut writes mutants/ and reads setup.cfg in
# its working folder, which must not be a checkout others run code from), then prints the
# survivors: `mutmut show NAME` in WORKDIR shows one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t sqdf-mutation.XXXXXX)}"
py="$root/.venv/bin/python"
"$py" -m pip show mutmut >/dev/null 2>&1 ||
    "$py" -m pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
mkdir -p "$work"
git -C "$root" archive HEAD | tar -x -C "$work"
cat >"$work/setup.cfg" <<'EOF'
[mutmut]
source_paths=sqdf
only_mutate=sqdf/core/*
pytest_add_cli_args=-p no:cacheprovider -q
pytest_add_cli_args_test_selection=
EOF
for sel in ${MUTATION_TESTS:-tests/core/ tests/methods/ tests/test_trainer.py \
    tests/test_truncated.py tests/test_mutants.py}; do
    echo "    $sel" >>"$work/setup.cfg"
done
cd "$work"
# mutmut forks each mutant's test process from a warmed-up one; a torch thread pool started
# before the fork can hang in the child, which mutmut then counts as a timeout (a kill)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
echo "mutation testing sqdf/core/ in $work" >&2
rc=0
if [ -n "${MUTATION_MINUTES:-}" ]; then
    timeout -s INT -k 120 "${MUTATION_MINUTES}m" \
        "$root/.venv/bin/mutmut" run --max-children "${MUTMUT_CHILDREN:-2}" || rc=$?
    [ "$rc" = 124 ] && echo "stopped after ${MUTATION_MINUTES} minutes" >&2
else
    "$root/.venv/bin/mutmut" run --max-children "${MUTMUT_CHILDREN:-2}" || rc=$?
fi
"$root/.venv/bin/mutmut" export-cicd-stats >/dev/null && cat mutants/mutmut-cicd-stats.json
"$root/.venv/bin/mutmut" results
exit "$rc"
