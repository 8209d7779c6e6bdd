"""A kill during sqdf bbo's fine-tuning, for the resume tests."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import sqdf.bbo.loop as loop


@contextmanager
def killed_in_round_one_fine_tuning(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Round 1's fine-tuning (the loop's second trainer call) raises KeyboardInterrupt, as a
    kill would stop it; the block must end there, and the real trainer is back after it."""
    real_train, calls = loop.train, []

    def train_then_crash(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kw)

    monkeypatch.setattr(loop, "train", train_then_crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(loop, "train", real_train)
