"""What the capacity measure scores: biographies and prompts as padded token rows, each
token tagged with its *role* (which attribute's value it belongs to, the name, or none).

- `bio_rows`: one biography per person, a fresh rendering with *training* templates
  (the measure of bits stored is the model's loss on the values of the text it was
  trained on, as in the paper).
- `prompt_rows`: one row per (person, attribute): "[BOS] Name <template text> value."
  with a training template ("trained"), a held-out one ("held_out"), or a question
  ("question": "[BOS] Question: ... Name ...? Answer: value."). Recall is exact match on
  the value and its closing "." (the model's greedy continuation is exactly the value).

The value's "." is part of every value span: the sentence end tells where the value
stops, so the value codes are prefix-free and the loss on a span is minus the log of a
proper probability over the list.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .lists import ATTRIBUTES
from .pieces import Pieces
from .population import Population, subset
from .stream import EVAL_EXPOSURE_BASE, ROLE_NONE, SUBJECT_WIDTH, name_columns, render, rows_to_tokens, sentences
from .templates import TEMPLATES, TRAIN_TEMPLATES

PROMPT_KINDS = ("trained", "held_out", "question")


@dataclass
class ScoredRows:
    tokens: torch.Tensor     # [M, L] int64, PAD after each row's end
    roles: torch.Tensor      # [M, L] int64: each token's role (-1 none, 0..5 attribute values, 6 the name)
    lengths: torch.Tensor    # [M] tokens in each row
    person: np.ndarray       # [M] the person's index in the population
    attribute: np.ndarray    # [M] the attribute a prompt row asks for (-1 for biographies)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batches(self, size: int):
        """(tokens, roles) in batches of `size` rows, each cut to its longest row."""
        for s in range(0, len(self), size):
            L = int(self.lengths[s:s + size].max())
            yield self.tokens[s:s + size, :L], self.roles[s:s + size, :L]


def _pad(pieces: Pieces, piece_ids: np.ndarray, roles: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, token_roles = rows_to_tokens(pieces, piece_ids, roles)
    row_len = np.where(piece_ids >= 0, pieces.length[np.maximum(piece_ids, 0)], 0).sum(1)
    M, L = len(row_len), int(row_len.max())
    row = np.repeat(np.arange(M), row_len)
    col = np.arange(len(tokens)) - np.repeat(np.cumsum(row_len) - row_len, row_len)
    out = np.full((M, L), pieces.tokenizer.pad_id, dtype=np.int64)
    out_roles = np.full((M, L), ROLE_NONE, dtype=np.int64)
    out[row, col], out_roles[row, col] = tokens, token_roles
    return torch.from_numpy(out), torch.from_numpy(out_roles), torch.from_numpy(row_len)


def bio_rows(pop: Population, pieces: Pieces, seed: int, people: np.ndarray) -> ScoredRows:
    piece_ids, roles = render(subset(pop, people), pieces.ids, seed, EVAL_EXPOSURE_BASE)
    tokens, token_roles, lengths = _pad(pieces, piece_ids, roles)
    return ScoredRows(tokens, token_roles, lengths, people, np.full(len(people), -1))


def prompt_rows(pop: Population, pieces: Pieces, seed: int, people: np.ndarray, kind: str) -> ScoredRows:
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
    sub, ids, n = subset(pop, people), pieces.ids, len(people)
    rng = np.random.default_rng([seed, EVAL_EXPOSURE_BASE + 1 + PROMPT_KINDS.index(kind)])
    all_ids, all_roles = [], []
    for a in ATTRIBUTES:
        lo, hi = (0, TRAIN_TEMPLATES) if kind == "trained" else (TRAIN_TEMPLATES, len(TEMPLATES[a]))
        s, r = sentences(sub, ids, a, rng.integers(lo, hi, size=n), named=np.ones(n, dtype=bool))
        if kind == "question":   # the question's two pieces around the name, then the value and "."
            q = ids[f"question:{a}"]
            s = np.concatenate([np.full((n, 1), q[0]), name_columns(sub, ids), np.full((n, 1), q[1]),
                                s[:, SUBJECT_WIDTH + 1:]], axis=1)
            r = np.concatenate([np.full((n, 5), ROLE_NONE, dtype=np.int8), r[:, SUBJECT_WIDTH + 1:]], axis=1)
        r = np.where(r == ATTRIBUTES.index(a), r, ROLE_NONE).astype(np.int8)   # score the value only
        all_ids.append(np.concatenate([np.full((n, 1), ids["special"][0]), s], axis=1))
        all_roles.append(np.concatenate([np.full((n, 1), ROLE_NONE, dtype=np.int8), r], axis=1))
    piece_ids, roles = np.concatenate(all_ids), np.concatenate(all_roles)
    tokens, token_roles, lengths = _pad(pieces, piece_ids, roles)
    return ScoredRows(tokens, token_roles, lengths, np.tile(people, len(ATTRIBUTES)),
                      np.repeat(np.arange(len(ATTRIBUTES)), n))
