"""The learn methods, by name: `learn` runs `METHODS[cfg.method]`.

A method is a `LearnMethod`: its name, the learning rate it uses when the config gives
none, and a `run(LearnRun)` that trains (the model and table prepared, the old rows'
freeze flags saved: `learn` restores them afterwards) and fills `run.result`. The
built-in ones (new_rows.py, baselines.py) register themselves when the package is
imported; `register` adds others.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from store_service.interface import KnowledgeTable

from ..data import Batch, ByteTokenizer, ExampleLoader
from ..model import Transformer
from .config import LearnConfig, LearnResult


@dataclass
class LearnRun:
    """One `learn` call as a method sees it."""
    model: Transformer
    table: KnowledgeTable
    examples: Sequence[Any]                  # TextFacts or corpus Examples
    tok: ByteTokenizer
    cfg: LearnConfig
    background: Sequence[Batch] | None       # pretraining batches (old text)
    loader: ExampleLoader                    # the training batches, by step
    lr: float                                # cfg.lr, or the method's default
    old_ids: torch.Tensor                    # the rows the table had before [N_old]
    result: LearnResult
    # new rows that stay frozen after the run (learn unfreezes the other new rows), e.g. detectors
    stay_frozen: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


@dataclass(frozen=True)
class LearnMethod:
    name: str
    default_lr: float                        # of what the method trains: rows, or model weights
    run: Callable[[LearnRun], None]


METHODS: dict[str, LearnMethod] = {}


def register(method: LearnMethod) -> LearnMethod:
    """Make `method` available as LearnConfig(method=method.name)."""
    METHODS[method.name] = method
    return method


def method_named(name: str) -> LearnMethod:
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]
