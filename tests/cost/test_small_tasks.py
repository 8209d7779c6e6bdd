"""The dry run's cost section on the small tasks, whose own networks and loss are traced."""

from __future__ import annotations

import pytest

from sqdf.cli import main


@pytest.mark.parametrize("method, drawn", [("refl", True), ("sqdf", False)])
def test_a_random_chain_length_is_said_to_be_one_draw(method, drawn, capsys):
    argv = ["train", "--task", "gmm2d", "--method", method, "--num-steps", "8",
            "--dry-run", "--gpu-memory", "1GiB"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GFLOP" in out and "fit: fits 1.00 GiB" in out
    assert ("this is one draw (generator seed 0)" in out) == drawn
