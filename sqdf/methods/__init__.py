"""Methods by name. A method is a loss over replayed cells:
``loss(task, cells, cfg, generator) -> (scalar loss, stats)``; the trainer does the rest."""

from __future__ import annotations

from collections.abc import Callable

from sqdf.methods.sqdf import sqdf_loss

METHODS: dict[str, Callable] = {"sqdf": sqdf_loss}
