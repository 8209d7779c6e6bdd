"""The oracle: plain floats out, every query counted, never beyond the budget, and bad
replies are a clear error or, when allowed, excluded and counted."""

import re

import numpy as np
import pytest
import torch

from sqdf.bbo.oracle import Oracle, OracleError

X = torch.zeros(4, 2)
C = torch.zeros(4, dtype=torch.long)


def test_counts_queries_and_never_exceeds_the_budget():
    oracle = Oracle("sum", lambda x, c: x.sum(1), budget=6)
    reply = oracle.query(X[:3] + 1, C[:3])
    assert reply.values.dtype == torch.float64 and not reply.values.requires_grad
    assert reply.values.tolist() == [2.0, 2.0, 2.0] and reply.problem == ""
    assert (oracle.used, oracle.calls, oracle.left) == (3, 1, 3)
    with pytest.raises(RuntimeError, match="4 queries asked for with 3 of 6 left"):
        oracle.query(X, C)
    assert oracle.used == 3  # a refused call costs nothing


def test_any_sequence_of_numbers_is_accepted_but_only_as_floats():
    for reply in ([1, 2, 3, 4], np.arange(4.0), torch.arange(4.0, requires_grad=True) * 2):
        values = Oracle("f", lambda x, c, r=reply: r, budget=4).query(X, C).values
        assert values.dtype == torch.float64 and values.grad_fn is None


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda x, c: 1 / 0, "raised ZeroDivisionError"),
        (lambda x, c: [1.0, float("nan"), 2.0, float("inf")], "2 non-finite value"),
        (lambda x, c: [1.0, 2.0], r"shape \(2,\) for 4 samples"),
        (lambda x, c: torch.zeros(4, 1), r"shape \(4, 1\)"),
        (lambda x, c: ["a", "b", "c", "d"], "not numbers"),
    ],
)
def test_bad_replies_are_clear_errors_or_counted_exclusions(fn, message):
    with pytest.raises(OracleError, match=message):
        Oracle("mine", fn, budget=8).query(X, C)
    oracle = Oracle("mine", fn, budget=8, drop_bad=True)
    reply = oracle.query(X, C)
    assert re.search(message, reply.problem) and "'mine'" in reply.problem
    assert oracle.used == 4  # the queries were paid for
    assert bool(torch.isnan(reply.values[~reply.ok]).all())
    expected_ok = [True, False, True, False] if "non-finite" in message else [False] * 4
    assert reply.ok.tolist() == expected_ok
