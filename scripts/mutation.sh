#!/usr/bin/env bash
# Mutation testing of sqdf/core/ with mutmut (issue 39): every small change mutmut makes to
# the pure math (an operator, a constant, a sign) should fail some test of tests/core/ or of
# the training tests. Not part of CI: on 2 cores it takes hours; tests/test_mutants.py is the
# CI-sized guard. The score is not yet measured (docs/reliability.md).
#
#   bash scripts/mutation.sh [WORKDIR]     # default WORKDIR: a new temporary folder
#   MUTMUT_CHILDREN=4 bash scripts/mutation.sh   # parallel mutants (default 2)
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
    tests/core/
    tests/methods/
    tests/test_trainer.py
    tests/test_truncated.py
    tests/test_mutants.py
EOF
cd "$work"
echo "mutation testing sqdf/core/ in $work" >&2
"$root/.venv/bin/mutmut" run --max-children "${MUTMUT_CHILDREN:-2}"
"$root/.venv/bin/mutmut" results
