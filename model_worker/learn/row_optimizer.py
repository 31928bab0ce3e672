"""The store's row optimizer for the length of a `learn` run."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from store_service.config import OptimizerConfig
from store_service.interface import KnowledgeTable


@contextlib.contextmanager
def row_optimizer(table: KnowledgeTable, kind: str, lr: float, key_lr: float | None = None,
                  bias_step: float | None = None) -> Iterator:
    """Rows (and flat keys, at key_lr; None: lr) are updated by this sparse optimizer, and
    flat-row balancing moves by `bias_step` (None: unchanged), from the next end_step until
    the block ends; then the table's own settings are back. Works on local and remote
    tables alike (`table.set_optimizer`). Yields the settings it replaced."""
    new = OptimizerConfig(kind=kind, lr=lr, key_lr=key_lr)
    replaced = table.set_optimizer(new, bias_step=bias_step)
    old = replaced.optimizer
    if (old.betas, old.eps) != (new.betas, new.eps):
        # the table's Adam constants stay as they were: only the kind and the rates change
        table.set_optimizer(dataclasses.replace(new, betas=old.betas, eps=old.eps), bias_step=bias_step)
    try:
        yield replaced
    finally:
        table.set_optimizer(old, bias_step=replaced.bias_step)
