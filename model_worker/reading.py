"""Per-call options of the knowledge layers, and the record of what they read.

The model owns both: `Transformer.reading` sets the options for the forwards inside
it and, with record=True, yields the trace they fill.

    with model.reading(k=4, readout="fetch", record=True) as trace:
        model(idx)
    read = trace.last()[layer]        # block index -> LayerRead of the last call
    read.ids, read.weights            # [B, S, h, k]
    read.gates                        # GateRecord (tables with gated rows), else None

    with recording(model) as trace:   # eval mode, fetch readout, record; the mode restored after
        model(idx)
        reads = trace.take()
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from .config import READOUT_MODES
from .gating import GateRecord


@dataclass(frozen=True)
class ReadOptions:
    """How the knowledge layers read on a call. None: the layer's own setting (its
    config's k and readout)."""
    k: int | None = None            # rows read per head and token
    readout: str | None = None      # "pushdown" | "fetch" | "auto" (readout.py)

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.readout is not None and self.readout not in READOUT_MODES:
            raise ValueError(f"readout mode must be one of {', '.join(READOUT_MODES)}; got {self.readout!r}")

    def within(self, outer: "ReadOptions") -> "ReadOptions":
        """These options inside `outer`: what these leave unset, the outer ones set."""
        return replace(self, k=outer.k if self.k is None else self.k,
                       readout=outer.readout if self.readout is None else self.readout)


@dataclass
class LayerRead:
    """What one knowledge layer read on one call."""
    ids: torch.Tensor                  # [B, S, h, k] row ids (-1: nothing)
    weights: torch.Tensor              # [B, S, h, k] readout weights
    gates: GateRecord | None = None    # tables with gated rows


@dataclass
class ReadTrace:
    """What the knowledge layers read, one entry per model call (in call order): block
    index -> LayerRead."""
    calls: list[dict[int, LayerRead]] = field(default_factory=list)

    def begin_call(self) -> None:
        self.calls.append({})

    def add(self, layer: int, read: LayerRead) -> None:
        self.calls[-1][layer] = read

    def last(self) -> dict[int, LayerRead]:
        return self.calls[-1]

    def take(self) -> dict[int, LayerRead]:
        """The last call's reads, forgotten by the trace (a loop over many batches keeps
        one call's worth)."""
        return self.calls.pop()

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights) of every call of block `layer`, joined along the sequence:
        [B, S_1 + S_2 + ..., h, k] (a generation: the prompt, then each new token)."""
        reads = [c[layer] for c in self.calls if layer in c]
        return torch.cat([r.ids for r in reads], 1), torch.cat([r.weights for r in reads], 1)

    def gates(self, layer: int) -> list[GateRecord]:
        """One GateRecord per call of block `layer` (tables with gated rows)."""
        return [c[layer].gates for c in self.calls if layer in c and c[layer].gates is not None]

    def layers(self) -> list[int]:
        return sorted({i for c in self.calls for i in c})


@contextlib.contextmanager
def recording(model) -> Iterator[ReadTrace]:
    """Eval mode, fetch readout (which leaves the store's usage counts alone) and a trace of
    what `model`'s knowledge layers read; the model's train/eval mode restored on exit."""
    was = model.training
    model.eval()
    try:
        with model.reading(readout="fetch", record=True) as trace:
            yield trace
    finally:
        model.train(was)
