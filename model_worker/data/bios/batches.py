"""The training stream: E exposures of a population, each a fresh rendering (new
templates, new sentence order, people shuffled), packed into rows of seq_len tokens.

Exposure e's biographies are concatenated and cut into rows of seq_len + 1 tokens at
stride seq_len (each token is a target once; a biography may run across rows); the
last row of an exposure is padded (those targets are IGNORE_INDEX), and so is the last
batch, so every person is seen exactly E times and every batch has one shape.
`batch()` then moves on; the position is (exposure, batch within it), so a run resumes
exactly, and `progress` (the fraction of the E exposures done) drives the learning-rate
schedule without counting every exposure's tokens in advance. The next exposure is
rendered on a background thread while the current one is trained on.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..dataset import IGNORE_INDEX, Batch
from .pieces import Pieces
from .population import Population
from .stream import render, rows_to_tokens


def exposure_tokens(pop: Population, pieces: Pieces, seed: int, exposure: int) -> np.ndarray:
    """The token stream of one exposure [T] int32: people in a fresh order, one biography each."""
    piece_ids, _ = render(pop, pieces.ids, seed, exposure)
    order = np.random.default_rng([seed, exposure, 1]).permutation(len(pop))
    return rows_to_tokens(pieces, piece_ids[order])


class BioStream:
    def __init__(self, pop: Population, pieces: Pieces, *, seed: int, exposures: int, seq_len: int,
                 batch_size: int, prefetch: bool = True):
        self.pop, self.pieces, self.seed, self.exposures = pop, pieces, seed, exposures
        self.seq_len, self.batch_size = seq_len, batch_size
        self.exposure, self.index = 0, 0          # the next batch: exposure, batch within it
        self.tokens_seen = 0                      # targets trained on so far
        self._rows: torch.Tensor | None = None    # the current exposure's rows [R, seq_len + 1]
        self._valid: torch.Tensor | None = None
        self._rows_of = -1
        self._pool = ThreadPoolExecutor(1) if prefetch else None
        self._next: tuple[int, Future] | None = None

    @property
    def done(self) -> bool:
        return self.exposure >= self.exposures

    @property
    def progress(self) -> float:
        """Fraction of the run done before the next batch (exposures, and batches within one)."""
        if self.done:
            return 1.0
        self._load(self.exposure)
        return (self.exposure + self.index / self.batches_in_exposure) / self.exposures

    @property
    def batches_in_exposure(self) -> int:
        return -(-self._rows.shape[0] // self.batch_size)

    def _pack(self, exposure: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = exposure_tokens(self.pop, self.pieces, self.seed, exposure)
        S = self.seq_len
        n_rows = -(-(len(tokens) - 1) // S)
        padded = np.full(n_rows * S + 1, self.pieces.tokenizer.pad_id, dtype=np.int64)
        padded[:len(tokens)] = tokens
        valid = np.zeros(n_rows * S + 1, dtype=bool)
        valid[:len(tokens)] = True
        idx = np.arange(n_rows)[:, None] * S + np.arange(S + 1)
        return torch.from_numpy(padded[idx]), torch.from_numpy(valid[idx])

    def _load(self, exposure: int) -> None:
        if self._rows_of == exposure:
            return
        if self._next is not None and self._next[0] == exposure:
            self._rows, self._valid = self._next[1].result()
        else:
            self._rows, self._valid = self._pack(exposure)
        self._rows_of, self._next = exposure, None
        if self._pool is not None and exposure + 1 < self.exposures:
            self._next = (exposure + 1, self._pool.submit(self._pack, exposure + 1))

    def batch(self) -> Batch:
        """The next batch [batch_size, seq_len], then advance."""
        if self.done:
            raise RuntimeError("the stream has run all its exposures")
        self._load(self.exposure)
        B = self.batch_size
        rows = self._rows[self.index * B:(self.index + 1) * B]
        valid = self._valid[self.index * B:(self.index + 1) * B]
        if rows.shape[0] < B:                       # the exposure's last batch: pad with empty rows
            fill = B - rows.shape[0]
            rows = torch.cat([rows, rows.new_full((fill, rows.shape[1]), self.pieces.tokenizer.pad_id)])
            valid = torch.cat([valid, valid.new_zeros((fill, valid.shape[1]))])
        targets = rows[:, 1:].masked_fill(~valid[:, 1:], IGNORE_INDEX)
        self.tokens_seen += int(valid[:, 1:].sum())
        self.index += 1
        if self.index >= self.batches_in_exposure:
            self.exposure, self.index = self.exposure + 1, 0
        return Batch(rows[:, :-1].contiguous(), targets.contiguous())

    def state_dict(self) -> dict:
        return {"exposure": self.exposure, "index": self.index, "tokens_seen": self.tokens_seen,
                "seed": self.seed, "people": len(self.pop), "seq_len": self.seq_len, "batch_size": self.batch_size,
                "exposures": self.exposures, "population": self.pop.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "people", "seq_len", "batch_size", "exposures", "population"):
            if state.get(k) != mine[k]:
                raise ValueError(f"stream state was saved with {k}={state.get(k)!r}, this stream has {mine[k]!r}")
        self.exposure, self.index, self.tokens_seen = state["exposure"], state["index"], state["tokens_seen"]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
