"""scripts/mutation_sample.py, the sampling half of scripts/mutation.sh: its Wilson interval
against the score test it inverts, its draw from mutmut's list of mutants, and one-line
errors for bad input (a failed draw must stop mutation.sh, not leave it to run every mutant)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location(
        "mutation_sample", ROOT / "scripts" / "mutation_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ms = load()


@pytest.mark.parametrize(("k", "n"), [(168, 190), (139, 190), (120, 190), (3, 7), (1, 2)])
def test_wilson_bounds_are_where_the_score_test_is_at_its_critical_value(k, n):
    # Wilson's interval inverts the score test: at each bound p, (k/n - p)^2 = z^2 p (1-p) / n
    lo, hi = ms.wilson(k, n)
    z = ms.Z95
    assert lo < k / n < hi
    for p in (lo, hi):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)


def test_wilson_at_the_ends_of_the_range():
    z2, n = ms.Z95**2, 40
    assert ms.wilson(0, n) == pytest.approx((0.0, z2 / (n + z2)))
    assert ms.wilson(n, n) == pytest.approx((n / (n + z2), 1.0))
    assert ms.wilson(0, 0) == (0.0, 1.0)
    assert math.isclose(ms.Z95, 1.959963984540054)


def _mutants(folder: Path, verdict: dict[str, int | None] | None = None) -> None:
    """A mutmut work folder: 10 mutants of sqdf/core/a.py, 6 of sqdf/methods/b.py."""
    verdict = verdict or {}
    for source, count in (("sqdf/core/a.py", 10), ("sqdf/methods/b.py", 6)):
        meta = folder / "mutants" / f"{source}.meta"
        meta.parent.mkdir(parents=True, exist_ok=True)
        stem = source[:-3].replace("/", ".")
        names = {f"{stem}.x_f__mutmut_{i}": None for i in range(1, count + 1)}
        names.update({k: v for k, v in verdict.items() if k in names})
        meta.write_text(json.dumps({"exit_code_by_key": names}))


def test_draw_is_per_part_fixed_by_its_seed_and_leaves_out_verdicts_and_skips(
    tmp_path, monkeypatch
):
    done = "sqdf.core.a.x_f__mutmut_1"
    _mutants(tmp_path, {done: 1})
    monkeypatch.chdir(tmp_path)
    skip = {"sqdf.core.a.x_f__mutmut_2"}
    a = ms.draw(4, 7, ["sqdf/core", "sqdf/methods"], skip)
    assert a == ms.draw(4, 7, ["sqdf/core", "sqdf/methods"], skip)
    core = [n for n in a if n.startswith("sqdf.core.")]
    assert len(core) == 4 and len(a) == 8 and len(set(a)) == 8
    assert done not in a and not skip & set(a)
    # all 6 of methods (fewer than asked), 8 of core's 8 left
    assert len(ms.draw(9, 7, ["sqdf/core", "sqdf/methods"], skip)) == 8 + 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no command"),
        (["draw", "4O", "39", "sqdf/core"], "N must be an integer, got '4O'"),
        (["draw", "0", "39", "sqdf/core"], "N must be >= 1, got 0"),
        (["draw", "4", "39"], "draw needs N SEED PART"),
        (["draw", "4", "39", "sqdf/cor"], "part 'sqdf/cor' matches no mutated file"),
        (["draw", "4", "39", "sqdf/core", "--skip", "missing.txt"], "cannot read missing.txt"),
        (["score", "--batches", "b.txt"], "needs --parts"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    _mutants(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        ms.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_draw_with_nothing_left_or_no_mutants_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        ms.main(["score", "sqdf/core"])
    assert "no mutants under" in capsys.readouterr().err
    _mutants(tmp_path, {f"sqdf.methods.b.x_f__mutmut_{i}": 1 for i in range(1, 7)})
    with pytest.raises(SystemExit):
        ms.main(["draw", "3", "1", "sqdf/methods"])
    assert "nothing to draw" in capsys.readouterr().err
