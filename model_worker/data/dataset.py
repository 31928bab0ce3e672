"""Training and evaluation batches from texts or examples.

Every document is tokenized as ``[BOS] + tokenizer.encode(text) + [EOS]``.

A `Batch` holds ``inputs`` and ``targets``, both LongTensor [B, T]; ``targets[b, t]``
is the token that follows ``inputs[b, t]``, or ``IGNORE_INDEX`` (-100, PyTorch's
default ``ignore_index``) where nothing is to be scored (padding, or the prompt in
answer-only batches). So the loss is ``F.cross_entropy(logits.flatten(0, 1),
targets.flatten())``.

Loaders are *indexed by step*: ``loader.batch(step)`` is a pure function of
(data, tokenizer, shapes, seed, step), so a run resumed at step s sees exactly the
batches it would have seen. Iterating yields ``batch(step)`` for step = start_step,
start_step + 1, ... without end; ``state_dict()`` / ``load_state_dict()`` carry the step.

- `PackedLoader`: documents shuffled per epoch (seed, epoch), concatenated and cut
  into rows of seq_len + 1 tokens at stride seq_len (each token is a target once;
  documents run across row boundaries). The main pretraining loader.
- `ExampleLoader`: one (prompt, completion) example per row, right-padded, loss on
  the completion and EOS only (``answer_only=False`` scores the prompt too). For
  fine-tuning on new facts.
- `packed_batches(texts, ...)` / `example_batches(examples, ...)`: a fixed, finite,
  unshuffled list of batches covering every token once, for held-out loss.
- `split_texts(texts, fraction, seed)`: a deterministic random train/held-out split.

    corpus = build_corpus("tiny"); tok = ByteTokenizer()
    loader = PackedLoader(corpus.train_texts, tok, seq_len=128, batch_size=16, seed=0)
    for batch in loader: ...                     # batch.inputs: [16, 128]
    heldout = packed_batches(corpus.heldout_texts, tok, seq_len=128, batch_size=16)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenizer import ByteTokenizer

IGNORE_INDEX = -100


@dataclass
class Batch:
    inputs: torch.Tensor    # [B, T] int64
    targets: torch.Tensor   # [B, T] int64, IGNORE_INDEX where not scored
    step: int | None = None

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device), self.step)


def encode_documents(texts: Sequence[str], tokenizer: ByteTokenizer) -> list[list[int]]:
    return [tokenizer.encode(t, bos=True, eos=True) for t in texts]


def split_texts(texts: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, heldout): a deterministic random `fraction` of texts held out."""
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    n = round(fraction * len(texts))
    held = set(idx[:n])
    return ([t for i, t in enumerate(texts) if i not in held],
            [t for i, t in enumerate(texts) if i in held])


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class _StepIndexed:
    """Shared iteration and state for loaders that define batch(step)."""

    steps_per_epoch: int

    def __init__(self, start_step: int = 0):
        self.step = start_step

    def batch(self, step: int) -> Batch:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        b = self.batch(self.step)
        self.step += 1
        return b

    def _identity(self) -> dict:
        """What a saved position is only valid for (checked on load)."""
        return {}

    def state_dict(self) -> dict:
        return {"step": self.step, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self._identity().items():
            if k in state and state[k] != v:
                raise ValueError(f"loader state was saved with {k}={state[k]!r}, this loader has {v!r}")
        self.step = int(state["step"])


class PackedLoader(_StepIndexed):
    """Packed rows of seq_len tokens, shuffled per epoch; batch(step) is deterministic."""

    def __init__(self, texts: Sequence[str], tokenizer: ByteTokenizer, seq_len: int,
                 batch_size: int, seed: int = 0, start_step: int = 0, shuffle: bool = True):
        super().__init__(start_step)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        docs = encode_documents(texts, tokenizer)
        self._lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])
        self._flat = np.fromiter((i for d in docs for i in d), dtype=np.int32, count=int(self._offsets[-1]))
        self.num_tokens = int(self._offsets[-1])
        self.rows_per_epoch = max(0, (self.num_tokens - 1) // seq_len)
        self.steps_per_epoch = self.rows_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_tokens} tokens do not fill one batch of "
                             f"{batch_size} x {seq_len}")
        self._cached_epoch, self._stream = None, None

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "num_tokens": self.num_tokens}

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            n = len(self._lengths)
            order = _epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            # gather documents in `order` without a Python loop over tokens
            starts, lengths = self._offsets[order], self._lengths[order]
            idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            self._stream = self._flat[idx + np.arange(self.num_tokens)]
            self._cached_epoch = epoch
        return self._stream

    def batch(self, step: int) -> Batch:
        epoch, i = divmod(step, self.steps_per_epoch)
        stream = self._epoch_stream(epoch)
        T, B = self.seq_len, self.batch_size
        rows = np.stack([stream[r * T: r * T + T + 1] for r in range(i * B, (i + 1) * B)])
        rows = torch.from_numpy(rows.astype(np.int64))
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), step)


def packed_batches(texts: Sequence[str], tokenizer: ByteTokenizer, seq_len: int,
                   batch_size: int) -> list[Batch]:
    """Every token of texts once, in order, padded at the end: for held-out loss."""
    stream = [i for d in encode_documents(texts, tokenizer) for i in d]
    n_rows = max(1, -(-(len(stream) - 1) // seq_len))
    rows = np.full((n_rows, seq_len + 1), tokenizer.pad_id, dtype=np.int64)
    tgt_ok = np.zeros((n_rows, seq_len + 1), dtype=bool)
    for r in range(n_rows):
        chunk = stream[r * seq_len: r * seq_len + seq_len + 1]
        rows[r, :len(chunk)] = chunk
        tgt_ok[r, 1:len(chunk)] = True
    rows, tgt_ok = torch.from_numpy(rows), torch.from_numpy(tgt_ok)
    targets = rows[:, 1:].masked_fill(~tgt_ok[:, 1:], IGNORE_INDEX)
    inputs = rows[:, :-1]
    return [Batch(inputs[s:s + batch_size].contiguous(), targets[s:s + batch_size].contiguous())
            for s in range(0, n_rows, batch_size)]


def collate_examples(examples, tokenizer: ByteTokenizer, answer_only: bool = True,
                     step: int | None = None) -> Batch:
    """Right-padded rows [BOS] prompt completion [EOS]; targets on the completion + EOS."""
    seqs, first_scored = [], []
    for e in examples:
        p = tokenizer.encode(e.prompt, bos=True)
        c = tokenizer.encode(e.completion, eos=True)
        seqs.append(p + c)
        first_scored.append(len(p) - 1 if answer_only else 0)  # target index of the first completion token
    T = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (s, f) in enumerate(zip(seqs, first_scored)):
        s = torch.tensor(s, dtype=torch.long)
        inputs[b, :len(s) - 1] = s[:-1]
        targets[b, f:len(s) - 1] = s[1 + f:]
    return Batch(inputs, targets, step)


class ExampleLoader(_StepIndexed):
    """One example per row, shuffled per epoch; batch(step) is deterministic."""

    def __init__(self, examples: Sequence, tokenizer: ByteTokenizer, batch_size: int,
                 seed: int = 0, start_step: int = 0, answer_only: bool = True):
        super().__init__(start_step)
        self.examples, self.tokenizer = list(examples), tokenizer
        self.batch_size, self.seed, self.answer_only = batch_size, seed, answer_only
        self.steps_per_epoch = len(self.examples) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.examples)} examples do not fill one batch of {batch_size}")

    def _identity(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "num_examples": len(self.examples)}

    def batch(self, step: int) -> Batch:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = _epoch_permutation(len(self.examples), self.seed, epoch)
        picked = [self.examples[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size]]
        return collate_examples(picked, self.tokenizer, self.answer_only, step)


def example_batches(examples: Sequence, tokenizer: ByteTokenizer, batch_size: int,
                    answer_only: bool = True) -> list[Batch]:
    """All examples once, in order (last batch may be smaller): answer-only held-out loss."""
    return [collate_examples(examples[s:s + batch_size], tokenizer, answer_only)
            for s in range(0, len(examples), batch_size)]
