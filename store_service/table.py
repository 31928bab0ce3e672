"""A knowledge table over shards: scatter, gather, merge, retry. No domain logic.

`Table` implements `interface.KnowledgeTable` over any list of
`interface.ShardHandle`s: in-process `Shard`s or gRPC `RemoteShard`s. It keeps
the shard map (row range and expected version per shard), routes each id to
its owner, merges per-shard top-k (`merge`) and sums partial readouts. When a shard
answers `StaleVersion` the map is refreshed and the *whole* operation is
retried, so an answer never mixes two versions; mutating calls carry a
request_id so a retried call is never applied twice.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from . import consistency, errors, labels, persistence
from . import validation as check
from .config import TableConfig
from .interface import (PAD_ID, SearchResult, SegmentInfo, ShardHandle, ShardInfo, SideQuery,
                        TableInfo, TagFilter, UsageStats)
from .merge import merge_results
from .optimizer import OptimizerConfig, RowOptimizer
from .shard import Shard


@dataclass(frozen=True)
class _ShardMap:
    infos: tuple[ShardInfo, ...]   # in handle order
    starts: torch.Tensor           # [S] int64
    ends: torch.Tensor             # [S] int64
    d_k: int
    d_v: int
    value_dtype: str
    segments: tuple[SegmentInfo, ...]

    @property
    def num_rows(self) -> int:
        return self.segments[-1].row_end


class Table:
    """The in-process (or client-side) table. Thread-safe: calls may come from many threads."""

    def __init__(self, shards: Sequence[ShardHandle], *, store_root: str | None = None,
                 parallel: bool | None = None, max_retries: int = 3, refresh_wait_s: float = 10.0):
        """parallel: call shards concurrently through a thread pool (default:
        only when some shard is not an in-process `Shard`)."""
        if not shards:
            raise errors.InvalidArgument("shards", "a table needs at least one shard")
        self.shards = list(shards)
        self.store_root = store_root
        self.max_retries = max_retries
        self.refresh_wait_s = refresh_wait_s
        self._parallel = parallel
        self._pool = self._make_pool()
        # Mutations whose answer nobody waits for (fetch mode's row gradients) go
        # out on their own threads, so they overlap the caller's work and never queue ahead
        # of a read on the shared pool; `flush` (every end_step) waits for them.
        self._send_pool = self._make_send_pool()
        self._pending: list[Future] = []
        self._pending_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._map: _ShardMap = self._describe()

    # -- construction ----------------------------------------------------------

    @classmethod
    def create(cls, config: TableConfig, store_root: str | None = None, **kwargs) -> "Table":
        """A fresh in-process table with the config's initialisation and partition."""
        shards = [Shard(config, i, r) for i, r in enumerate(config.shard_ranges())]
        return cls(shards, store_root=store_root, **kwargs)

    @classmethod
    def open(cls, store_root: str, version: int | None = None, *, device: str | None = None,
             pin_memory: bool | None = None, **kwargs) -> "Table":
        """An in-process table serving a published version (default: the latest), its rows on
        `device` (pin_memory: host rows page-locked for a GPU caller; default as published)."""
        if version is None:
            version = persistence.latest_version(store_root)
            if version is None:
                raise errors.NotFound(f"no published version under {store_root}")
        root = persistence.read_root_attrs(store_root, version)
        shards = [Shard.load(store_root, version, s["shard_id"], device, pin_memory) for s in root["shards"]]
        return cls(shards, store_root=store_root, **kwargs)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for pool in (self._pool, self._send_pool):
                if pool is not None:
                    pool.shutdown(wait=True)

    # -- shard map -------------------------------------------------------------

    def _describe(self) -> _ShardMap:
        """Describe every shard until they agree on one version and tile [0, N)
        (a hot swap in progress can briefly show a mix)."""
        deadline = time.monotonic() + self.refresh_wait_s
        while True:
            descs = self._each(lambda i, s: s.describe())
            last = max(descs, key=lambda d: d.info.row_end)
            ranges = sorted((d.info.row_start, d.info.row_end) for d in descs)
            tiled = ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) \
                and ranges[-1][1] == last.segments[-1].row_end
            one_version = len({d.info.version for d in descs}) == 1
            if tiled and one_version:
                break
            if time.monotonic() > deadline:
                if tiled:   # name the shard a restart left on another version
                    consistency.agreed(self)
                raise errors.FailedPrecondition(
                    f"shards disagree: ranges {ranges}, versions {[d.info.version for d in descs]}")
            time.sleep(0.01)
        infos = tuple(d.info for d in descs)
        return _ShardMap(infos, torch.tensor([i.row_start for i in infos], dtype=torch.int64),
                         torch.tensor([i.row_end for i in infos], dtype=torch.int64),
                         last.d_k, last.d_v, last.value_dtype, last.segments)

    def _make_pool(self, name: str = "table", min_shards: int = 2) -> ThreadPoolExecutor | None:
        parallel = self._parallel
        if parallel is None:
            parallel = not all(isinstance(s, Shard) for s in self.shards)
        return ThreadPoolExecutor(len(self.shards), name) if parallel and len(self.shards) >= min_shards else None

    def _make_send_pool(self) -> ThreadPoolExecutor | None:
        # Background sends pay off even to a single remote shard.
        return self._make_pool("table-send", min_shards=1)

    def rebind(self, shards: Sequence[ShardHandle], *, refresh: bool = True) -> list[ShardHandle]:
        """Serve from a new set of shard handles (the store was re-partitioned or a
        shard moved); returns the old handles for the caller to close."""
        if not shards:
            raise errors.InvalidArgument("shards", "a table needs at least one shard")
        self.flush()
        old, old_pools = self.shards, (self._pool, self._send_pool)
        self.shards = list(shards)
        self._pool, self._send_pool = self._make_pool(), self._make_send_pool()
        for pool in old_pools:
            if pool is not None:
                pool.shutdown(wait=False)
        if refresh:
            self.refresh()
        return old

    def refresh(self) -> None:
        m = self._describe()
        with self._map_lock:
            self._map = m

    def info(self) -> TableInfo:
        m = self._map
        return TableInfo(m.d_k, m.d_v, m.num_rows, m.value_dtype, m.segments, m.infos)

    # -- plumbing --------------------------------------------------------------

    def _each(self, fn: Callable, which: Sequence[int] | None = None) -> list:
        """fn(index, shard) for the shards `which` (default all), in parallel when pooled.
        Waits for every call before raising the first error."""
        idx = list(range(len(self.shards))) if which is None else list(which)
        if self._pool is None or len(idx) < 2:
            return [fn(i, self.shards[i]) for i in idx]
        futures = [self._pool.submit(fn, i, self.shards[i]) for i in idx]
        errs = [f.exception() for f in futures]
        for e in errs:
            if e is not None:
                raise e
        return [f.result() for f in futures]

    def _stale_retry(self, attempt: int, deadline: float) -> None:
        """After a StaleVersion: give up once max_retries are spent and refresh_wait_s has
        passed (swaps may follow each other back to back), else refresh the map."""
        if attempt >= self.max_retries and time.monotonic() > deadline:
            raise
        if attempt >= self.max_retries:
            time.sleep(min(0.005 * (attempt - self.max_retries + 1), 0.05))
        self.refresh()

    def _retrying(self, op: Callable[[_ShardMap], object]):
        """Run op against the current map; on StaleVersion refresh and rerun all of it."""
        deadline = time.monotonic() + self.refresh_wait_s
        attempt = 0
        while True:
            m = self._map
            try:
                return op(m)
            except errors.StaleVersion:
                self._stale_retry(attempt, deadline)
                attempt += 1

    @staticmethod
    def _owner(m: _ShardMap, ids: torch.Tensor) -> torch.Tensor:
        """Index (into handle order) of each id's shard; -1 for PAD. Computed on the ids'
        device: a GPU worker's ids ([tokens x heads x k], megabytes a step) never cross to the host."""
        if len(m.infos) == 1:
            return (ids >= 0).long() - 1
        order = torch.argsort(m.starts).to(ids.device)
        pos = torch.searchsorted(m.ends.to(ids.device)[order], ids, right=True).clamp_max(len(order) - 1)
        return torch.where(ids >= 0, order[pos], torch.full_like(ids, -1))

    # -- data plane --------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int, *, tags: Sequence[str] = (), where: TagFilter | None = None,
               side: SideQuery | None = None, want_keys: bool = False) -> SearchResult:
        """queries [B, d_k] fp32 -> SearchResult [B, k] over every shard's keys, with the
        selected rows' `tags`, only rows passing `where`, with `side` the table's best
        rows of that partition (`SearchResult.side`, [B, side.k]), and with want_keys the
        selected rows' keys [B, k, d_k] (else keys None)."""
        check.tensor("queries", queries, torch.float32, (None, self._map.d_k))
        check.integer("k", k, 1)
        tags = check.tag_names(tags)
        where, side = check.tag_filter(where), check.side_query(side)
        for name, n in (("k", k), ("side.k", 0 if side is None else side.k)):
            if n > self._map.num_rows:
                raise errors.InvalidArgument(name, f"{name}={n} exceeds the table's {self._map.num_rows} rows")

        def op(m: _ShardMap) -> SearchResult:
            parts = self._each(lambda i, s: s.search(queries, k, tags=tags, where=where, side=side,
                                                     want_keys=want_keys, version=m.infos[i].version))
            res = merge_results(parts, k, tags, queries.device)
            if side is not None:
                res.side = merge_results([p.side for p in parts], side.k, tags, queries.device)
            return res
        return self._retrying(op)

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """ids [M] int64 (PAD allowed) -> [M, d_v] in the value dtype, 0 at PAD, on `device`
        (default the ids'). hits [M] int64 and weight_sum [M] float64 (both or neither):
        record the fetch-mode readout's use of the rows, as a pushdown readout records its own."""
        check.tensor("ids", ids, torch.int64, (None,))
        check.fetch_usage(ids, hits, weight_sum)

        def op(m: _ShardMap) -> torch.Tensor:
            check.ids_in_table("ids", ids, m.num_rows, allow_pad=True)
            owner = self._owner(m, ids)
            which = [int(i) for i in torch.unique(owner) if i >= 0]
            dtype = torch.bfloat16 if m.value_dtype == "bfloat16" else torch.float32
            # Host ids, rows wanted on a GPU: each shard's part goes straight to the GPU (a
            # GPU shard's never through the host), and no device work waits on the ids.
            out_device = ids.device if device is None else torch.device(device)
            if len(which) == 1 and bool((owner == which[0]).all()):
                sels = None
            else:
                sels = {i: (owner == i).to(out_device) for i in which}

            def call(i, s):
                sel = slice(None) if sels is None else sels[i].to(ids.device)
                if hits is None:
                    return s.fetch(ids[sel], version=m.infos[i].version)
                return s.fetch(ids[sel], hits=hits[sel], weight_sum=weight_sum[sel], version=m.infos[i].version)
            parts = self._each(call, which)
            if sels is None:     # one shard owns every id: its answer is the result
                return parts[0].to(out_device, dtype)
            out = torch.zeros(ids.shape[0], m.d_v, dtype=dtype, device=out_device)
            for i, part in zip(which, parts):
                out[sels[i]] = part.to(out_device, dtype)
            return out
        return self._retrying(op)

    def _scatter_readout(self, m: _ShardMap, ids: torch.Tensor, checks: Callable, call: Callable,
                         shape: Callable[[], tuple]) -> torch.Tensor:
        """Check, send each owner its ids (the rest PAD), sum the parts into zeros of `shape()`.
        One shard holds all rows (`_describe`) and reads the device verdicts itself: not twice."""
        if len(m.infos) == 1:
            check.host_side(checks)
            parts = self._each(lambda i, s: call(s, ids, m.infos[i].version), [0])
        else:
            check.at_once(checks)
            owner = self._owner(m, ids.reshape(-1)).reshape(ids.shape).to(ids.device)
            which = [int(i) for i in torch.unique(owner) if i >= 0]
            local = {i: torch.where(owner == i, ids, torch.full_like(ids, PAD_ID)) for i in which}
            parts = self._each(lambda i, s: call(s, local[i], m.infos[i].version), which)
        out = torch.zeros(shape(), device=ids.device)
        for p in parts:
            out += p.to(ids.device)
        return out

    def readout(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids [T, k], weights [T, k] fp32 -> [T, d_v] fp32 = sum_j w_j V[ids_j]."""
        return self._retrying(lambda m: self._scatter_readout(
            m, ids, lambda d: (check.readout_entries(ids, weights, d),
                               check.ids_in_table("ids", ids, m.num_rows, allow_pad=True, defer=d)),
            lambda s, loc, v: s.readout(loc, weights, version=v), lambda: (ids.shape[0], m.d_v)))

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "") -> torch.Tensor:
        """grad_out [T, d_v] fp32 -> grad of weights [T, k] fp32; row gradients stay on the shards."""
        rid = request_id or uuid.uuid4().hex  # so our own retries are never applied twice
        return self._retrying(lambda m: self._scatter_readout(
            m, ids, lambda d: (check.readout_entries(ids, weights, d),
                               check.tensor("grad_out", grad_out, torch.float32, (ids.shape[0], m.d_v), d),
                               check.ids_in_table("ids", ids, m.num_rows, allow_pad=True, defer=d)),
            lambda s, loc, v: s.readout_backward(loc, weights, grad_out, request_id=rid, version=v),
            lambda: tuple(ids.shape)))

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str = "") -> None:
        """ids [M] (flat rows or PAD), grads [M, d_k] fp32."""
        check.tensor("ids", ids, torch.int64, (None,))
        check.tensor("grads", grads, torch.float32, (ids.shape[0], self._map.d_k))
        rid = request_id or uuid.uuid4().hex

        def op(m: _ShardMap) -> None:
            parts = dict(self._split(m, ids, grads))
            check.flat_rows("ids", ids, m.segments)
            self._each(lambda i, s: s.accumulate_key_grads(*parts[i], request_id=rid, version=m.infos[i].version),
                       list(parts))
        self._retrying(op)

    def _split(self, m: _ShardMap, ids: torch.Tensor, *tensors: torch.Tensor
               ) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
        """(shard index, (ids, *tensors) restricted to its rows) for every shard owning some
        of ids [M] (checked against the map; PAD goes nowhere)."""
        check.ids_in_table("ids", ids, m.num_rows, allow_pad=True)
        owner = self._owner(m, ids)
        out = []
        for i in (int(i) for i in torch.unique(owner) if i >= 0):
            sel = owner == i
            out.append((i, (ids[sel], *(t[sel] for t in tensors))))
        return out

    # -- fetch mode: row gradients computed by the caller ----------------------------

    def _send_later(self, i: int, call: Callable[[ShardHandle, int], None]) -> None:
        """call(shard, expected version) for shard i, in the background when the shards are
        remote. A StaleVersion (the shard flipped meanwhile) refreshes the map and resends
        to that shard: these mutations are per row, and a flip keeps a shard's rows."""
        def task() -> None:
            deadline = time.monotonic() + self.refresh_wait_s
            attempt = 0
            while True:
                try:
                    return call(self.shards[i], self._map.infos[i].version)
                except errors.StaleVersion:
                    self._stale_retry(attempt, deadline)
                    attempt += 1
        if self._send_pool is None:
            task()
            return
        fut = self._send_pool.submit(task)
        with self._pending_lock:
            self._pending.append(fut)

    def flush(self) -> None:
        """Wait for every mutation sent in the background; raise the first error among them
        (each has been retried as any call is)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        errs = [f.exception() for f in pending]
        for e in errs:
            if e is not None:
                raise e

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str = "") -> None:
        """ids [M] (repeats summed), grads [M, d_v] fp32: row gradients computed by the caller
        (fetch mode), applied at end_step like readout_backward's (sent in the background)."""
        check.tensor("ids", ids, torch.int64, (None,))
        check.tensor("grads", grads, torch.float32, (ids.shape[0], self._map.d_v))
        rid = request_id or uuid.uuid4().hex
        for i, (sub, g) in self._split(self._map, ids, grads):
            self._send_later(i, lambda s, v, sub=sub, g=g: s.accumulate_value_grads(
                sub, g, request_id=rid, version=v))

    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1, request_id: str = "",
                 timeout_s: float = 60.0) -> int:
        """Step barrier on every shard (after this worker's background sends have landed);
        returns the table's new step."""
        check.integer("step", step, 0)
        check.integer("num_workers", num_workers, 1)
        check.integer("worker", worker, 0, num_workers)
        self.flush()
        if consistency.needs_check(self):
            consistency.agreed(self)   # never step a table whose shards disagree (one restarted)
        rid = request_id or uuid.uuid4().hex

        def call(i, s):
            return s.end_step(step, worker=worker, num_workers=num_workers, request_id=rid, timeout_s=timeout_s)
        if self._pool is None or len(self.shards) < 2:
            steps = [call(i, s) for i, s in enumerate(self.shards)]
        else:
            # Barrier calls block until every worker arrives: give them their own
            # threads, so workers sharing this table cannot starve the shared pool.
            with ThreadPoolExecutor(len(self.shards), "table-barrier") as pool:
                futures = [pool.submit(call, i, s) for i, s in enumerate(self.shards)]
                steps = [f.result() for f in futures]
        with self._map_lock:
            m = self._map
            infos = tuple(dataclasses.replace(info, step=max(info.step, st)) for info, st in zip(m.infos, steps))
            self._map = dataclasses.replace(m, infos=infos)
        return min(steps)

    # -- control plane -------------------------------------------------------------

    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tags: Mapping[str, torch.Tensor] | None = None, partition: torch.Tensor | int = 0
                 ) -> torch.Tensor:
        """values [M, d_v], keys [M, d_k] (, selection bias [M], default 0; tags name -> [M]
        int64 >= -1, default unset; partition [M] int64 >= 0 or one int, default 0) -> new
        ids [M], appended to the last flat segment (by the shard holding the table's last rows)."""
        m = self._map
        if tags:
            check.tag_count(list(self.info().tag_rows), [check.tag_name("tags", n) for n in tags])
        last = max(range(len(self.shards)), key=lambda i: m.infos[i].row_end)
        ids = self.shards[last].add_rows(values, keys, bias, tags=tags, partition=partition)
        self.refresh()
        return ids

    def set_optimizer(self, optimizer: OptimizerConfig, *, bias_step: float | None = None) -> RowOptimizer:
        """Every shard uses `optimizer` (and `bias_step`, when given) from the next end_step
        on; returns the settings replaced (those of the shard holding row 0)."""
        check.row_optimizer(optimizer, bias_step)
        self.flush()
        m = self._map
        old = self._each(lambda i, s: s.set_optimizer(optimizer, bias_step=bias_step))
        return old[min(range(len(old)), key=lambda i: m.infos[i].row_start)]

    def _route(self, ids: torch.Tensor, flag, call: Callable) -> None:
        check.flag("flag", flag)
        check.tensor("ids", ids, torch.int64, (None,))
        m = self._map
        check.ids_in_table("ids", ids, m.num_rows, allow_pad=False)
        owner = self._owner(m, ids).to(ids.device)
        which = [int(i) for i in torch.unique(owner)]
        self._each(lambda i, s: call(s, ids[owner == i]), which)

    def set_frozen(self, ids: torch.Tensor, frozen: bool = True) -> None:
        self._route(ids, frozen, lambda s, sub: s.set_frozen(sub, frozen))

    def set_ablated(self, ids: torch.Tensor, ablated: bool = True) -> None:
        self._route(ids, ablated, lambda s, sub: s.set_ablated(sub, ablated))

    def usage(self) -> UsageStats:
        """Usage of every row [N], in id order."""
        self.flush()
        m = self._map
        parts = self._each(lambda i, s: s.usage())
        order = sorted(range(len(parts)), key=lambda i: m.infos[i].row_start)
        return UsageStats(*(torch.cat([getattr(parts[i], f) for i in order])
                            for f in ("hits", "weight_sum", "frozen", "ablated")))

    # -- versions ------------------------------------------------------------------

    def snapshot(self, *, full: bool = False) -> int:
        """Publish the current state (take it between steps) as a new version: each shard
        writes the rows changed since its base version where it can (a delta, read as a
        whole; `snapshots`), or its whole state (`full`, or where no delta can serve). Once
        published, the serving states carry its number (`labels`), not the one they had."""
        if self.store_root is None:
            raise errors.FailedPrecondition("snapshot: this table has no store_root")
        self.flush()
        held, _ = consistency.agreed(self)   # never publish shards of different steps or versions
        published = [i.version for i in self._map.infos if labels.is_published(i.version)]
        version = max([persistence.latest_version(self.store_root) or 0, *published]) + 1
        with persistence.staged_version(self.store_root, version) as stage:
            self._each(lambda i, s: s.write_snapshot(stage, version, full=full))
            persistence.finish_version(stage, version)
        self._each(lambda i, s: s.relabel_version(held, version))
        self.refresh()
        return version

    def recover(self, version: int | None = None) -> tuple[int, int]:
        """Roll every shard back to published `version` (default: the latest) after some
        shard restarted; -> the (version, step) they are then at (store_service.consistency)."""
        return consistency.recover(self, version)

    def load_version(self, version: int) -> None:
        """Hot swap: every shard loads `version` beside the serving one, all flip, the old ones go once
        their requests end. States held under `version` first take a fresh unpublished label (`labels`)."""
        check.integer("version", version, 1, labels.UNPUBLISHED)
        if self.store_root is not None and not os.path.isdir(persistence.version_path(self.store_root, version)):
            raise errors.NotFound(f"version {version} is not published under {self.store_root}")
        self.flush()
        disowned = labels.unpublished_label()
        moved = self._each(lambda i, s: s.relabel_version(version, disowned))
        # what to release after the flip (no map refresh: a recovery's shards disagree until then)
        old = [{info.version, *([disowned] if n else [])} - {version} for info, n in zip(self._map.infos, moved)]
        store_root = self.store_root
        try:
            self._each(lambda i, s: s.prepare_version(store_root, version))
        except BaseException:
            for s in self.shards:  # drop what was prepared; the serving versions are untouched
                try:
                    s.release_version(version)
                except errors.StoreError:
                    pass
            raise
        self._each(lambda i, s: s.flip_version(version))
        self.refresh()
        self._each(lambda i, s: [s.release_version(v) for v in sorted(old[i])])

