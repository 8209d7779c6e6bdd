#!/usr/bin/env bash
# Mutation testing with mutmut (issue 39) of sqdf/core/, sqdf/methods/ and the trainer's update
# phase (sqdf/training/gradients.py, sqdf/training/update.py): every small change mutmut makes
# (an operator, a constant, a sign) should fail some test of tests/core/, tests/methods/ or the
# training tests. Not part of CI: on 2 cores a full run takes hours; tests/test_mutants.py is
# the CI-sized guard. The score and its survivors are in docs/reliability.md.
#
#   bash scripts/mutation.sh [WORKDIR]     # default WORKDIR: a new temporary folder
#   MUTATION_PATHS="sqdf/methods" bash scripts/mutation.sh   # what to mutate, part by part
#       # (space-separated; a part is a file or folder of sqdf/, or several joined by commas);
#       # default: sqdf/core sqdf/methods sqdf/training/gradients.py,sqdf/training/update.py
#   MUTATION_TESTS="tests/core/" bash scripts/mutation.sh   # another test selection
#   MUTATION_SAMPLE=40 MUTATION_SEED=39 bash scripts/mutation.sh   # a uniform random sample of
#       # 40 mutants per part of MUTATION_PATHS, drawn (fixed seed) from mutmut's own list of
#       # those without a verdict in WORKDIR and not named in MUTATION_SKIP (a file of names,
#       # e.g. those an earlier run reached), run with `mutmut run NAME...`; the score printed
#       # per part is then an estimate with its 95% Wilson interval. Run it again with the same
#       # WORKDIR and another seed to add a batch (WORKDIR/batch-SEED.txt): batches are
#       # sequential draws without replacement, so their union is still a uniform sample; a
#       # part's share of a batch counts only if all of it ran (mutmut runs the mutants it
#       # expects to be fast first: what a stopped batch reached is no uniform sample)
#   MUTATION_MINUTES=30 bash scripts/mutation.sh  # stop after 30 minutes (SIGINT: mutmut
#                                                # keeps the verdicts it reached)
#   MUTMUT_CHILDREN=2 bash scripts/mutation.sh   # parallel mutants (default 1: a shared machine)
#   PYTHON=/path/to/python bash scripts/mutation.sh   # default: the checkout's .venv
#
# It works in a copy of the committed tree (mutmut writes mutants/ and reads setup.cfg in
# its working folder, which must not be a checkout others run code from), under nice, then
# prints the survivors: `mutmut show NAME` in WORKDIR shows one. Run again with the same
# WORKDIR, it keeps the verdicts there and the per-test statistics it collected.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t sqdf-mutation.XXXXXX)}"
py="${PYTHON:-$root/.venv/bin/python}"
mutmut="$(dirname "$py")/mutmut"
paths="${MUTATION_PATHS:-sqdf/core sqdf/methods sqdf/training/gradients.py,sqdf/training/update.py}"
"$py" -m pip show mutmut 2>/dev/null | grep -q '^Version: 3.8.1$' ||
    "$py" -m pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
mkdir -p "$work"
[ -d "$work/sqdf" ] || git -C "$root" archive HEAD | tar -x -C "$work"
cp "$root/scripts/mutation_sample.py" "$work/.mutation_sample.py"
{
    echo "[mutmut]"
    echo "source_paths=sqdf"
    echo "only_mutate="
    for p in ${paths//,/ }; do
        case "$p" in *.py) echo "    $p" ;; *) echo "    ${p%/}/*" ;; esac
    done
    # what the tests read besides the code (a guide's commands, the presets)
    printf 'also_copy=\n    docs/\n    configs/\n    README.md\n'
    echo "pytest_add_cli_args=-p no:cacheprovider -p no:xdist -q"
    echo "pytest_add_cli_args_test_selection="
    # the tests that call the mutated code: the math's own, the methods', the short trainings
    for sel in ${MUTATION_TESTS:-tests/core/ tests/methods/ tests/test_trainer.py \
        tests/test_truncated.py tests/test_mutants.py}; do
        echo "    $sel"
    done
} >"$work/setup.cfg"
cd "$work"
# mutmut forks each mutant's test process from a warmed-up one; a torch thread pool started
# before the fork can hang in the child, which mutmut then counts as a timeout (a kill)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
names=()
if [ -n "${MUTATION_SAMPLE:-}" ]; then
    [ -d mutants ] || nice -n 15 "$py" .mutation_sample.py generate >/dev/null
    skip=()
    [ -n "${MUTATION_SKIP:-}" ] && skip=(--skip "$(cd "$root" && realpath "$MUTATION_SKIP")")
    # a command substitution, not `< <(...)`: set -e then stops here when the draw fails (bad
    # N, a part with no mutants, nothing left), instead of `mutmut run` with no names (all)
    # shellcheck disable=SC2086
    drawn="$("$py" .mutation_sample.py draw "$MUTATION_SAMPLE" "${MUTATION_SEED:-39}" \
        $paths "${skip[@]}")"
    mapfile -t names <<<"$drawn"
    printf '%s\n' "${names[@]}" >"batch-${MUTATION_SEED:-39}.txt"
    echo "sampled ${#names[@]} mutants (listed in $work/batch-${MUTATION_SEED:-39}.txt)" >&2
fi
echo "mutation testing $paths in $work" >&2
rc=0
run=(nice -n 15 "$mutmut" run --max-children "${MUTMUT_CHILDREN:-1}" "${names[@]}")
if [ -n "${MUTATION_MINUTES:-}" ]; then
    timeout -s INT -k 120 "${MUTATION_MINUTES}m" "${run[@]}" || rc=$?
    [ "$rc" = 124 ] && echo "stopped after ${MUTATION_MINUTES} minutes" >&2
else
    "${run[@]}" || rc=$?
fi
# shellcheck disable=SC2086
if [ -n "${MUTATION_SAMPLE:-}" ]; then
    "$py" .mutation_sample.py score --batches batch-*.txt --parts $paths
else
    "$py" .mutation_sample.py score $paths
fi
"$mutmut" results
exit "$rc"
