"""Deployment knobs: fewer rows per token, rows laid out by use, a hot-row cache.

    with inference_k(model, 4): answer(...)                 # read k=4 rows instead of k_train
    plan = cooccurrence_order(model, tok, corpus.train_texts)
    new_version = publish_reordered(store_root, version, plan)   # rows moved, ids remapped
    permute_model(model, plan)                              # the codebooks follow (same function)
    cached = CachedTable(table, capacity=4096, policy="lru")  # for fetch-mode generation
    model.attach_table(cached); ...; cached.stats()

Reordering. Product-key row ids are tied to the codebooks (id = i*n + j), so a
product segment is reordered only by permuting the codebooks: permuting
codebook_a's rows moves whole blocks of n rows, permuting codebook_b's rows
moves the rows inside every block the same way. The model's codebooks and
sub-key biases are permuted with the same permutations, so the model computes
exactly what it did. Flat segments are reordered freely (first-touch order).
Blocks and sub-keys are ordered spectrally (Fiedler vector of the co-occurrence
graph of "used by the same document").
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from store_service import persistence
from store_service.config import segments_from_json
from store_service.interface import SEGMENT_FLAT, SEGMENT_PRODUCT, KnowledgeTable

from .data import ByteTokenizer, collate_examples
from .generate import recording_rows
from .model import Transformer


# -- k at inference ---------------------------------------------------------------------------

@contextlib.contextmanager
def inference_k(model: Transformer, k: int):
    """Every knowledge layer reads k rows per head instead of its trained k."""
    kls = model.knowledge_layers()
    old = [kl.k for kl in kls]
    for kl in kls:
        if not 1 <= k <= kl.n * kl.n:
            raise ValueError(f"k={k} outside [1, {kl.n * kl.n}]")
        kl.k = k
    try:
        yield
    finally:
        for kl, k0 in zip(kls, old):
            kl.k = k0


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
    kls = model.knowledge_layers()
    out: list[torch.Tensor] = []
    with recording_rows(model):
        for s in range(0, len(texts), batch_size):
            b = collate_examples([_Doc("", t) for t in texts[s:s + batch_size]], tok, answer_only=False)
            model(b.inputs)
            valid = b.targets != -100
            for i in range(b.inputs.shape[0]):
                ids = torch.cat([kl.last_ids[i][valid[i]].flatten(1) for kl in kls], 1)   # [S_i, L*h*k]
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
    """Publish a new version with every row moved to its new id (values, keys,
    optimizer state, masks, usage: all bitwise), same shard layout. Returns it."""
    root = persistence.read_root_attrs(store_root, version)
    vdir = persistence.version_path(store_root, version)
    olds = sorted((persistence.read_shard(vdir, s["shard_id"]) for s in root["shards"]),
                  key=lambda d: d.attrs["row_start"])
    segments = segments_from_json(root["segments"])
    if segments[0].kind != SEGMENT_PRODUCT or segments[0].n_sub != plan.n_sub:
        raise ValueError("the plan's product segment does not match the table's")
    if any(s.kind not in (SEGMENT_PRODUCT, SEGMENT_FLAT) for s in segments) or \
            sum(s.kind == SEGMENT_PRODUCT for s in segments) != 1:
        raise ValueError("reordering supports one product segment followed by flat segments")
    old_of_new = plan.old_of_new.numpy()
    new_of_old = plan.new_of_old.numpy()
    names = olds[0].arrays
    whole = {k: np.concatenate([d.arrays[k] for d in olds])
             for k in persistence.ROW_ARRAYS + persistence.FLAT_ARRAYS if k in names}
    rows = {k: whole[k][old_of_new] for k in persistence.ROW_ARRAYS if k in whole}
    flat_new_ids = new_of_old[whole["flat_ids"]] if whole["flat_ids"].size else whole["flat_ids"]
    o = np.argsort(flat_new_ids, kind="stable")
    flat = {k: whole[k][o] for k in persistence.FLAT_ARRAYS if k in whole}
    flat["flat_ids"] = flat_new_ids[o].astype(whole["flat_ids"].dtype)
    pa, pb = plan.perm_a.numpy(), plan.perm_b.numpy()
    new_version = max(persistence.list_versions(store_root) + [version]) + 1
    with persistence.staged_version(store_root, new_version) as stage:
        for d in olds:
            lo, hi = d.attrs["row_start"], d.attrs["row_end"]
            arrays = {k: v[lo:hi] for k, v in rows.items()}
            sel = (flat["flat_ids"] >= lo) & (flat["flat_ids"] < hi)
            arrays.update({k: v[sel] for k, v in flat.items()})
            for name, arr in d.arrays.items():             # store-side codebooks, if any
                if name.startswith("pk"):
                    arrays[name] = arr[pa] if name.endswith(("_a",)) else arr[pb]
            attrs = dict(d.attrs, version=new_version)
            persistence.write_shard(stage, persistence.ShardData(attrs, arrays))
        persistence.finish_version(stage, new_version)
    return new_version


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


# -- hot-row cache ----------------------------------------------------------------------------

class CachedTable:
    """A `KnowledgeTable` whose `fetch` is served from a cache of hot rows (LRU or
    LFU); everything else goes to the wrapped table. Vectorised: a slot per cached
    row in one [capacity, d_v] tensor, a dense id -> slot map, and one `fetch` of
    the missing rows per call (none when every row is cached). The cache empties
    itself when the table's version changes and after any call that can change
    rows (end_step, add_rows, load_version)."""

    def __init__(self, inner: KnowledgeTable, capacity: int = 4096, policy: str = "lru"):
        if policy not in ("lru", "lfu"):
            raise ValueError(f"policy must be 'lru' or 'lfu', got {policy!r}")
        self.inner, self.capacity, self.policy = inner, max(0, int(capacity)), policy
        self._lock = threading.Lock()
        self._version = inner.info().version
        self._vals: torch.Tensor | None = None
        self.clear()
        self.hits = self.misses = self.fetch_calls = self.calls_served = 0

    def __getattr__(self, name):  # the rest of the protocol, and anything else (store_root, shards)
        return getattr(self.inner, name)

    def clear(self) -> None:
        with self._lock:
            self._slot_of = torch.full((self.inner.info().num_rows,), -1, dtype=torch.int64)  # id -> slot
            self._row_of = torch.full((self.capacity,), -1, dtype=torch.int64)                 # slot -> id
            self._last = torch.full((self.capacity,), -1, dtype=torch.int64)                   # LRU: tick of last use
            self._freq = torch.zeros(self.capacity, dtype=torch.int64)                         # LFU: uses
            self._tick = 0

    def cached_ids(self) -> set[int]:
        return set(self._row_of[self._row_of >= 0].tolist())

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "fetch_calls": self.fetch_calls, "calls_served_from_cache": self.calls_served,
                "call_hit_rate": self.calls_served / self.fetch_calls if self.fetch_calls else 0.0,
                "cached_rows": int((self._row_of >= 0).sum()), "capacity": self.capacity, "policy": self.policy}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.fetch_calls = self.calls_served = 0

    def info(self):
        return self.inner.info()

    def warm(self, ids: torch.Tensor | None = None) -> int:
        """Preload rows: `ids`, or by default the rows the store's usage counts say are
        read most (as many as fit). A cache that starts hot serves whole fetch calls
        without a round trip from the first token on. -> rows loaded."""
        if ids is None:
            hits = self.inner.usage().hits
            ids = torch.topk(hits.double(), min(self.capacity, hits.numel())).indices
            ids = ids[hits[ids] > 0]
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.int64))[: self.capacity]
        if ids.numel() == 0:
            return 0
        vals = self.inner.fetch(ids)
        with self._lock:
            if self._vals is None:
                self._vals = torch.zeros(self.capacity, vals.shape[1], dtype=vals.dtype)
            self._insert(ids, vals)
        return int(ids.numel())

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None) -> torch.Tensor:
        """ids [M] int64 (PAD -1 allowed) -> [M, d_v], 0 at PAD. A fetch that records usage
        (a training readout's: hits / weight_sum) must reach the store: it bypasses the cache."""
        if hits is not None or weight_sum is not None:
            return self.inner.fetch(ids, hits=hits, weight_sum=weight_sum)
        info = self.inner.info()
        if info.version != self._version or info.num_rows > self._slot_of.numel():
            self.clear()
            self._version = info.version
        with self._lock:
            self.fetch_calls += 1
            self._tick += 1
            valid = ids >= 0
            slots = torch.full_like(ids, -1)
            slots[valid] = self._slot_of[ids[valid]]
            hit = slots >= 0
            miss = valid & ~hit
            self.hits += int(hit.sum())
            self.misses += int(miss.sum())
            if self._vals is not None:
                out = torch.zeros(ids.shape[0], self._vals.shape[1], dtype=self._vals.dtype)
            if bool(hit.any()):
                hs = slots[hit]
                out[hit] = self._vals[hs]
                self._last[hs] = self._tick
                self._freq[hs] += 1
            if not bool(miss.any()):
                self.calls_served += 1
                return out if self._vals is not None else self.inner.fetch(ids)
            want = torch.unique(ids[miss])                                   # sorted
            vals = self.inner.fetch(want)                                    # [U, d_v]
            if self._vals is None:
                self._vals = torch.zeros(self.capacity, vals.shape[1], dtype=vals.dtype)
                out = torch.zeros(ids.shape[0], vals.shape[1], dtype=vals.dtype)
                if bool(hit.any()):
                    out[hit] = self._vals[slots[hit]]
            out[miss] = vals[torch.searchsorted(want, ids[miss])]
            self._insert(want, vals)
            return out

    def _insert(self, ids: torch.Tensor, vals: torch.Tensor) -> None:
        m = min(ids.numel(), self.capacity)
        if m == 0:
            return
        key = self._last if self.policy == "lru" else self._freq
        key = torch.where(self._row_of < 0, torch.full_like(key, -2), key)  # free slots first
        victims = torch.topk(key, m, largest=False).indices
        old = self._row_of[victims]
        self._slot_of[old[old >= 0]] = -1
        ids, vals = ids[:m], vals[:m]
        self._row_of[victims] = ids
        self._slot_of[ids] = victims
        self._vals[victims] = vals.to(self._vals.dtype)
        self._last[victims] = self._tick
        self._freq[victims] = 1

    # calls that can change rows: pass through, then forget
    def end_step(self, *a, **kw):
        out = self.inner.end_step(*a, **kw)
        self.clear()
        return out

    def add_rows(self, *a, **kw):
        out = self.inner.add_rows(*a, **kw)
        self.clear()
        return out

    def load_version(self, *a, **kw):
        out = self.inner.load_version(*a, **kw)
        self.clear()
        return out


def timed_generation(model: Transformer, tok: ByteTokenizer, prompts: Sequence[str], max_new_tokens: int = 16
                     ) -> tuple[float, int]:
    """(seconds, generated tokens) for greedy answers to prompts, one prompt at a time
    (batch 1: the setting where fetch mode and a cache matter)."""
    from .generate import generate
    n = 0
    t0 = time.perf_counter()
    for p in prompts:
        out = generate(model, torch.tensor([tok.encode(p, bos=True)]), max_new_tokens, eos_id=tok.eos_id)
        n += out.tokens.numel()
    return time.perf_counter() - t0, n
