"""Rows laid out by use: a co-occurrence order of the rows, and the model permuted to match.

    trace = usage_trace(model, tok, corpus.train_texts, per="token")
    plan = cooccurrence_order(trace, table.info().num_rows, n_sub)
    new_version = publish_reordered(store_root, version, plan)   # rows moved, ids remapped
    permute_model(model, plan)                                  # the codebooks follow (same function)
    locality(trace, page_rows)                                  # pages and id runs a fetch touches

Product-key row ids are tied to the codebooks (id = i*n + j), so a product segment
is reordered only by permuting the codebooks: permuting codebook_a's rows moves
whole blocks of n rows, permuting codebook_b's rows moves the rows inside every
block the same way. The model's codebooks and sub-key biases are permuted with the
same permutations, so the model computes exactly what it did. Flat segments are
reordered freely (first-touch order). Blocks and sub-keys are ordered spectrally
(Fiedler vector of the co-occurrence graph of "used by the same document").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from store_service.versions import publish_permuted

from .data import ByteTokenizer, collate_examples
from .model import Transformer
from .reading import recording


# -- usage traces ---------------------------------------------------------------------------

@dataclass
class _Doc:
    prompt: str
    completion: str


@torch.no_grad()
def usage_trace(model: Transformer, tok: ByteTokenizer, texts: Sequence[str], batch_size: int = 16,
                per: str = "doc") -> list[torch.Tensor]:
    """The unique rows read (all knowledge layers, all heads) per document (`per="doc"`)
    or per token (`per="token"`: what one decode step fetches), sorted."""
    out: list[torch.Tensor] = []
    with recording(model) as trace:
        for s in range(0, len(texts), batch_size):
            b = collate_examples([_Doc("", t) for t in texts[s:s + batch_size]], tok, answer_only=False)
            model(b.inputs)
            valid = b.targets != -100
            reads = list(trace.take().values())
            for i in range(b.inputs.shape[0]):
                ids = torch.cat([r.ids[i][valid[i]].flatten(1) for r in reads], 1)   # [S_i, L*h*k]
                if per == "doc":
                    out.append(torch.unique(ids[ids >= 0]))
                else:
                    out.extend(torch.unique(t[t >= 0]) for t in ids)
    return out


# -- reordering -----------------------------------------------------------------------------

@dataclass
class ReorderPlan:
    """new id -> old id for every row (`old_of_new` [N]); for the product segment
    (rows [0, n^2)) also the codebook permutations (new sub-key -> old sub-key)."""
    old_of_new: torch.Tensor   # [N] int64
    perm_a: torch.Tensor       # [n]
    perm_b: torch.Tensor       # [n]
    n_sub: int

    @property
    def new_of_old(self) -> torch.Tensor:
        inv = torch.empty_like(self.old_of_new)
        inv[self.old_of_new] = torch.arange(self.old_of_new.numel())
        return inv

    def remap(self, old_ids: torch.Tensor) -> torch.Tensor:
        """Old ids (PAD -1 kept) -> new ids."""
        inv = self.new_of_old
        return torch.where(old_ids >= 0, inv[old_ids.clamp_min(0)], old_ids)


def _spectral_order(co: torch.Tensor) -> torch.Tensor:
    """Order of the nodes of a co-occurrence graph [n, n] by its Fiedler vector,
    so that nodes used together sit together; unused nodes go last."""
    co = co.double().clone()
    co.fill_diagonal_(0)
    deg = co.sum(1)
    used = deg > 0
    order_used = torch.zeros(0, dtype=torch.int64)
    if int(used.sum()) > 2:
        idx = used.nonzero().squeeze(1)
        c = co[idx][:, idx]
        d = c.sum(1)
        lap = torch.eye(len(idx), dtype=torch.float64) - c / torch.sqrt(d[:, None] * d[None, :])
        _, vec = torch.linalg.eigh(lap)
        order_used = idx[torch.argsort(vec[:, 1] / torch.sqrt(d))]
    else:
        order_used = used.nonzero().squeeze(1)
    return torch.cat([order_used, (~used).nonzero().squeeze(1)])


def cooccurrence_order(trace: Sequence[torch.Tensor], num_rows: int, n_sub: int) -> ReorderPlan:
    """A reorder plan from a usage trace (the rows each document read)."""
    n = n_sub
    P = n * n
    co_a = torch.zeros(n, n)
    co_b = torch.zeros(n, n)
    first_touch = torch.full((num_rows,), len(trace), dtype=torch.int64)
    for d, ids in enumerate(trace):
        prod = ids[ids < P]
        for sub, co in ((torch.unique(prod // n), co_a), (torch.unique(prod % n), co_b)):
            co[sub[:, None], sub[None, :]] += 1.0 / max(1, sub.numel())
        flat = ids[ids >= P]
        first_touch[flat] = torch.minimum(first_touch[flat], torch.full_like(flat, d))
    perm_a, perm_b = _spectral_order(co_a), _spectral_order(co_b)
    old_prod = (perm_a[:, None] * n + perm_b[None, :]).reshape(-1)             # new id -> old id
    flat_ids = torch.arange(P, num_rows)
    flat_new = flat_ids[torch.argsort(first_touch[P:], stable=True)] if num_rows > P else flat_ids
    return ReorderPlan(torch.cat([old_prod, flat_new]), perm_a, perm_b, n)


def publish_reordered(store_root: str, version: int, plan: ReorderPlan) -> int:
    """Publish a new version with every row moved to its new id (values, keys, tags,
    optimizer state, masks, usage: all bitwise), same shard layout. Returns it."""
    return publish_permuted(store_root, version, plan.new_of_old, {0: (plan.perm_a, plan.perm_b)})


@torch.no_grad()
def permute_model(model: Transformer, plan: ReorderPlan) -> None:
    """Permute every knowledge layer's codebooks and sub-key biases to match the plan."""
    for kl in model.knowledge_layers():
        kl.codebook_a.copy_(kl.codebook_a[plan.perm_a])
        kl.codebook_b.copy_(kl.codebook_b[plan.perm_b])
        kl.bias_a.copy_(kl.bias_a[plan.perm_a])
        kl.bias_b.copy_(kl.bias_b[plan.perm_b])


def locality(trace: Sequence[torch.Tensor], page_rows: int, group: int = 1) -> dict:
    """Fetch locality of a trace, per batch of `group` documents: distinct pages of
    `page_rows` rows touched, contiguous id runs (range reads), and rows."""
    pages, runs, rows = [], [], []
    for s in range(0, len(trace), group):
        ids = torch.unique(torch.cat(list(trace[s:s + group])))
        if ids.numel() == 0:
            continue
        rows.append(ids.numel())
        pages.append(torch.unique(ids // page_rows).numel())
        runs.append(int((ids[1:] != ids[:-1] + 1).sum()) + 1)
    f = lambda x: float(np.mean(x)) if x else 0.0
    return {"rows": f(rows), "pages": f(pages), "runs": f(runs), "page_rows": page_rows, "trace_units_per_batch": group}
