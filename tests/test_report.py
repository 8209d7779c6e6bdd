"""The numbers of the results tables (sqdf.infra.report.format_number, format_mean_std, mean_std):
each cell, read back as a number, is the value to within half a unit of its last digit, and a
cell stays short at any magnitude."""

from __future__ import annotations

import math
import statistics

import pytest

from sqdf.infra.report import format_mean_std, format_number, mean_std


def read_back(cell: str) -> float:
    return float(cell.replace(",", ""))


def last_digit(cell: str) -> float:
    """The unit of a cell's last shown digit."""
    text = cell.replace(",", "").lstrip("-")
    if "e" in text:
        mantissa, exponent = text.split("e")
        decimals = len(mantissa.partition(".")[2])
        return 10.0 ** (int(exponent) - decimals)
    return 10.0 ** -len(text.partition(".")[2])


@pytest.mark.parametrize(
    "x",
    [0.0, 0.037, -8.677, 1.5, 999.4, 1000.0, 10259.211, -6148.101, 86266.091, 999_999.0,
     1_370_533.258, 37455967193929048.0, -6.410142655102527e33, 651174889914368.0],
)  # fmt: skip
def test_a_cell_reads_back_as_its_value_within_half_its_last_digit(x: float) -> None:
    cell = format_number(x)
    assert abs(read_back(cell) - x) <= 0.5 * last_digit(cell) * (1 + 1e-9), cell
    assert len(cell) <= 10, cell  # 37455967193929048.000 was 21 characters
    if abs(x) < 1e3:  # below a thousand the cells are as they were: three decimals
        assert cell == f"{x:.3f}"


def test_the_styles_at_their_bounds() -> None:
    assert format_number(999.0) == "999.000"
    assert format_number(86266.091) == "86,266"
    assert format_number(-6148.101) == "-6,148"
    assert format_number(37455967193929048.0) == "3.75e16"
    assert format_number(-6.41e33) == "-6.41e33"
    assert format_number(math.inf) == "inf"
    assert format_number(math.nan) == "nan"


def test_mean_and_std_share_the_style_of_the_larger() -> None:
    assert format_mean_std(-6148.101, 8409.583) == "-6,148 ± 8,410"
    assert format_mean_std(915.42, 32.734) == "915.420 ± 32.734"
    assert format_mean_std(0.5, 2000.0) == "0 ± 2,000"
    assert format_mean_std(10486951.882, 17876633.387) == "1.05e7 ± 1.79e7"
    assert format_mean_std(1.0, math.nan) == "1.000 ± nan"


def test_mean_std_cells_against_statistics() -> None:
    values = [3.0e16, 1.1e17, 2.5e15]
    mean, std = statistics.mean(values), statistics.stdev(values)
    cell = mean_std(values)
    shown_mean, shown_std = (read_back(c) for c in cell.split(" ± "))
    assert shown_mean == pytest.approx(mean, rel=5e-3)
    assert shown_std == pytest.approx(std, rel=5e-3)
    assert mean_std([0.1234, math.nan]) == "0.123"  # NaN left out, the one value
    assert mean_std([651174889914368.0]) == "6.51e14"
    assert mean_std([math.nan]) == "n/a"
    assert mean_std([1.0, math.inf]) == "inf"
