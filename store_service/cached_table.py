"""A client-side cache of hot rows in front of a knowledge table, for fetch-mode generation.

    cached = CachedTable(table, capacity=4096, policy="lru")
    model.attach_table(cached); ...; cached.stats()

It implements `KnowledgeTable` (interface.py): `fetch` is served from the cache where it
can; every other call goes to the wrapped table, and the calls that can change rows
(end_step, add_rows, load_version) empty the cache.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from .interface import KnowledgeTable, SearchResult, SideQuery, TableInfo, TagFilter, UsageStats
from .optimizer import OptimizerConfig, RowOptimizer


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
              weight_sum: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """ids [M] int64 (PAD -1 allowed) -> [M, d_v], 0 at PAD, on `device` (default the
        ids'). A fetch that records usage (a training readout's: hits / weight_sum) must
        reach the store: it bypasses the cache."""
        if hits is not None or weight_sum is not None:
            return self.inner.fetch(ids, hits=hits, weight_sum=weight_sum, device=device)
        out = self._cached_fetch(ids)
        return out if device is None else out.to(device)

    def _cached_fetch(self, ids: torch.Tensor) -> torch.Tensor:
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

    # -- the rest of KnowledgeTable: the wrapped table's -----------------------
    @property
    def store_root(self) -> str | None:
        """Where the wrapped table publishes its versions (None: it does not say)."""
        return getattr(self.inner, "store_root", None)

    def info(self) -> TableInfo:
        return self.inner.info()

    def search(self, queries: torch.Tensor, k: int, *, tags: Sequence[str] = (), where: TagFilter | None = None,
               side: SideQuery | None = None, want_keys: bool = False) -> SearchResult:
        return self.inner.search(queries, k, tags=tags, where=where, side=side, want_keys=want_keys)

    def readout(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.inner.readout(ids, weights)

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "") -> torch.Tensor:
        return self.inner.readout_backward(ids, weights, grad_out, request_id=request_id)

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str = "") -> None:
        self.inner.accumulate_key_grads(ids, grads, request_id=request_id)

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str = "") -> None:
        self.inner.accumulate_value_grads(ids, grads, request_id=request_id)

    def flush(self) -> None:
        self.inner.flush()

    def set_optimizer(self, optimizer: OptimizerConfig, *, bias_step: float | None = None) -> RowOptimizer:
        return self.inner.set_optimizer(optimizer, bias_step=bias_step)

    def set_frozen(self, ids: torch.Tensor, frozen: bool = True) -> None:
        self.inner.set_frozen(ids, frozen)

    def set_ablated(self, ids: torch.Tensor, ablated: bool = True) -> None:
        self.inner.set_ablated(ids, ablated)

    def usage(self) -> UsageStats:
        return self.inner.usage()

    def snapshot(self, *, full: bool = False) -> int:
        return self.inner.snapshot(full=full)

    # calls that can change rows: pass through, then forget
    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1, request_id: str = "") -> int:
        out = self.inner.end_step(step, worker=worker, num_workers=num_workers, request_id=request_id)
        self.clear()
        return out

    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tags: Mapping[str, torch.Tensor] | None = None, partition: torch.Tensor | int = 0
                 ) -> torch.Tensor:
        out = self.inner.add_rows(values, keys, bias, tags=tags, partition=partition)
        self.clear()
        return out

    def load_version(self, version: int) -> None:
        self.inner.load_version(version)
        self.clear()

    def close(self) -> None:
        """Close the wrapped table, when it has connections to close."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
