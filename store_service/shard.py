"""One shard of a knowledge table: the rows of one id range and everything done to them.

A `Shard` implements `interface.ShardHandle`. The gRPC server wraps one; the
in-process `Table` calls it directly. All domain logic lives here:
validation, search over the keys it holds, pushdown readout, gradient
accumulation, the step barrier, the sparse optimizer, balancing, edits,
usage, snapshots and versions.

Concurrency. The data of one version is a `_State` with its own lock; every
read and write of that version holds it, so a reader never sees half an
optimizer step. The shard holds one serving state and, during a hot swap, a
prepared one and retiring ones. `_vlock` guards that table of versions and
the in-flight count per state; `release_version` makes a retiring state
unreachable, then waits until it has no request in flight.

Versions. A state's version is the published version it was loaded from; a
fresh shard serves version 0. `write_snapshot` does not relabel the serving
state. A request names the version it expects (0 = whatever is serving) and
is answered by the serving, a retiring or a prepared state of that number,
else it gets StaleVersion. Gradients accumulated on a state that is flipped
away before its end_step are dropped with it: swap between steps.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass

import torch

from . import errors, kernels, persistence
from .config import TableConfig, segments_from_json, segments_to_json
from .flat_index import FaissFlatIndex, exact_topk
from .interface import (PAD_ID, SEGMENT_FLAT, SEGMENT_PRODUCT, Detections, SearchResult, SegmentInfo,
                        ShardDescription, ShardInfo, UsageStats)
from .optimizer import RowState, sparse_step

_INIT_BLOCK = 4096        # initial rows are drawn per block of global ids: independent of sharding
_MAX_SEEN_REQUESTS = 1 << 16
_MAX_SEARCH_K = 1 << 16   # the most rows a shard that is not the table's last returns per query


class BarrierTimeout(errors.FailedPrecondition):
    """end_step waited longer than timeout_s for the other workers."""


# -- validation (raises before anything changes) --------------------------------

def _tensor(field: str, t, dtype: torch.dtype | tuple[torch.dtype, ...], shape: tuple) -> torch.Tensor:
    """shape: ints must match, None matches anything."""
    if not isinstance(t, torch.Tensor):
        raise errors.InvalidArgument(field, f"expected a tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise errors.InvalidArgument(field, f"dtype must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise errors.InvalidArgument(field, f"shape must be {want}, got {list(t.shape)}")
    if t.numel() == 0:
        raise errors.InvalidArgument(field, f"empty batch (shape {list(t.shape)})")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise errors.InvalidArgument(field, "contains NaN or Inf")
    return t


def _ids(field: str, ids: torch.Tensor, lo: int, hi: int, *, allow_pad: bool) -> None:
    bad = (ids < lo) | (ids >= hi)
    if allow_pad:
        bad &= ids != PAD_ID
    if bool(bad.any()):
        first = int(ids[bad].reshape(-1)[0])
        raise errors.InvalidArgument(field, f"id {first} is not in this shard's rows [{lo}, {hi})"
                                     + (" (and is not padding -1)" if allow_pad else ""))


def _int(field: str, x, lo: int, hi: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise errors.InvalidArgument(field, f"expected an int, got {type(x).__name__}")
    if x < lo or (hi is not None and x >= hi):
        raise errors.InvalidArgument(field, f"{x} is out of range [{lo}, {'inf' if hi is None else hi})")
    return x


# -- state ---------------------------------------------------------------------

@dataclass
class _ProductPiece:
    """The part of one product segment a shard owns: first-codebook rows [i0, i1)."""
    seg_index: int
    seg: SegmentInfo
    i0: int
    i1: int
    codebook_a: torch.Tensor  # [n, d_k/2], the whole codebook (copies on every shard)
    codebook_b: torch.Tensor  # [n, d_k/2]
    bias_a: torch.Tensor      # [n] fp32; entries [i0, i1) are this shard's
    bias_b: torch.Tensor      # [n] fp32; balanced over this shard's rows only

    @property
    def local_lo(self) -> int:  # offset in global ids of the piece's first row
        return self.seg.row_start + self.i0 * self.seg.n_sub


class _State:
    """One version of a shard's data, with its lock, accumulators and barrier."""

    def __init__(self, *, config: TableConfig, shard_id: int, version: int, step: int,
                 row_start: int, row_end: int, segments: tuple[SegmentInfo, ...],
                 values: torch.Tensor, frozen: torch.Tensor, ablated: torch.Tensor,
                 hits: torch.Tensor, weight_sum: torch.Tensor, opt: RowState,
                 flat_ids: torch.Tensor, keys: torch.Tensor, flat_bias: torch.Tensor, key_opt: RowState,
                 pieces: list[_ProductPiece], flat_cue: torch.Tensor | None = None,
                 flat_gate: torch.Tensor | None = None):
        self.config, self.shard_id, self.version, self.step = config, shard_id, version, step
        self.row_start, self.row_end, self.segments = row_start, row_end, segments
        self.values, self.frozen, self.ablated = values, frozen, ablated            # [R, d_v], [R], [R]
        self.hits, self.weight_sum, self.opt = hits, weight_sum, opt                # [R] int64, [R] f64
        self.flat_ids, self.keys, self.flat_bias = flat_ids, keys, flat_bias        # [F], [F, d_k], [F]
        # cue / gate group labels per flat row [F] int64, -1 = none (versions written before
        # they existed have neither)
        none = torch.full((flat_ids.numel(),), -1, dtype=torch.int64, device=flat_ids.device)
        self.flat_cue = none if flat_cue is None else flat_cue
        self.flat_gate = none.clone() if flat_gate is None else flat_gate
        # whether any flat row has a label (searches of unlabelled shards skip gathering them)
        self.labelled = bool((self.flat_cue >= 0).any() or (self.flat_gate >= 0).any())
        self.key_opt, self.pieces = key_opt, pieces
        self.step_hits = torch.zeros_like(hits)   # load since the last end_step (balancing)
        self.row_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (local rows, grads) pairs
        self.key_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat positions, grads)
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.arrivals: dict[int, tuple[int, set[int]]] = {}  # step -> (num_workers, workers)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.inflight = 0
        self.faiss: FaissFlatIndex | None = None
        self._reindex()

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    def _reindex(self) -> None:
        # local row -> position among flat rows (-1 for product rows)
        self.flat_pos = torch.full((self.num_rows,), -1, dtype=torch.int64, device=self.device)
        self.flat_local = self.flat_ids - self.row_start
        self.flat_pos[self.flat_local] = torch.arange(self.flat_ids.numel(), device=self.device)
        # detectors (a cue and a gate): evidence only, kept out of the top-k and of balancing
        detector = (self.flat_cue >= 0) & (self.flat_gate >= 0)
        self.detector_pos = torch.nonzero(detector).flatten()                  # [D] positions among flat rows
        self.flat_detector = detector if self.detector_pos.numel() else None   # [F] bool, None when there are none
        if self.faiss is not None:
            self.faiss.invalidate()

    def searchable_rows(self) -> int:
        """Rows of the whole table that search covers (as this version knows the table)."""
        return sum(s.num_rows for s in self.segments
                   if s.kind == SEGMENT_FLAT or (s.kind == SEGMENT_PRODUCT and self.config.store_codebooks))

    def mark_seen(self, request_id: str) -> bool:
        """True if request_id was seen before (and so must not be applied again)."""
        if not request_id:
            return False
        if request_id in self.seen:
            return True
        self.seen[request_id] = None
        if len(self.seen) > _MAX_SEEN_REQUESTS:
            self.seen.popitem(last=False)
        return False


# -- the shard -----------------------------------------------------------------

class Shard:
    """Owns global rows [row_start, row_end) of a table. Implements ShardHandle."""

    def __init__(self, config: TableConfig, shard_id: int = 0, row_range: tuple[int, int] | None = None):
        """A fresh shard with the config's initialisation. row_range defaults to
        the config's partition (config.shard_ranges()[shard_id])."""
        lo, hi = row_range if row_range is not None else config.shard_ranges()[shard_id]
        self.shard_id = shard_id
        self._vlock = threading.Lock()
        self._vcond = threading.Condition(self._vlock)
        self._serving = _init_state(config, shard_id, lo, hi)
        self._pending: dict[int, _State] = {}
        self._retiring: list[_State] = []

    @classmethod
    def load(cls, store_root: str, version: int, shard_id: int, device: str | None = None) -> "Shard":
        """A shard serving its subgroup of a published version."""
        self = cls.__new__(cls)
        self.shard_id = shard_id
        self._vlock = threading.Lock()
        self._vcond = threading.Condition(self._vlock)
        self._serving = _load_state(store_root, version, shard_id, device)
        self._pending, self._retiring = {}, []
        return self

    @property
    def device(self) -> torch.device:
        """Where the serving version's rows live (a hot swap keeps the device)."""
        return self._serving.device

    # -- versions and in-flight accounting ----------------------------------

    @contextlib.contextmanager
    def _use(self, version: int):
        _int("version", version, 0)
        with self._vlock:
            st = self._resolve(version)
            st.inflight += 1
        try:
            yield st
        finally:
            with self._vlock:
                st.inflight -= 1
                self._vcond.notify_all()

    def _resolve(self, version: int) -> _State:
        if version == 0 or version == self._serving.version:
            return self._serving
        for st in reversed(self._retiring):
            if st.version == version:
                return st
        if version in self._pending:
            return self._pending[version]
        raise errors.StaleVersion(version, self._serving.version)

    def prepare_version(self, store_root: str, version: int) -> None:
        _int("version", version, 1)
        st = _load_state(store_root, version, self.shard_id, str(self._serving.device))
        with self._vlock:
            self._pending[version] = st

    def flip_version(self, version: int) -> None:
        with self._vlock:
            if version not in self._pending:
                raise errors.NotFound(f"version {version} is not prepared on shard {self.shard_id}")
            self._retiring.append(self._serving)
            self._serving = self._pending.pop(version)

    def release_version(self, version: int, timeout_s: float = 60.0) -> None:
        """Drop retiring (and prepared, never flipped) states of `version` once no
        request is in flight on them. Never touches the serving state; a version
        the shard does not hold is a no-op."""
        with self._vcond:
            self._pending.pop(version, None)
            # Unreachable from now on (new requests for it get StaleVersion), so
            # steady traffic from stale clients cannot hold the drain open.
            going = [s for s in self._retiring if s.version == version]
            self._retiring = [s for s in self._retiring if s.version != version]
            if not self._vcond.wait_for(lambda: all(s.inflight == 0 for s in going), timeout_s):
                raise errors.FailedPrecondition(f"version {version}: requests still in flight after "
                                                f"{timeout_s}s; dropped anyway")

    # -- describe ------------------------------------------------------------

    def describe(self) -> ShardDescription:
        with self._use(0) as st, st.lock:
            return ShardDescription(
                info=ShardInfo(self.shard_id, st.row_start, st.row_end, st.version, st.step,
                               gated_rows=int((st.flat_gate >= 0).sum()),
                               detector_rows=int(st.detector_pos.numel())),
                d_k=st.config.d_k, d_v=st.config.d_v, value_dtype=st.config.value_dtype,
                segments=st.segments)

    def health(self) -> bool:
        return True

    # -- data plane ----------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int, *, detectors: int = 0, version: int = 0) -> SearchResult:
        """queries [B, d_k] fp32 -> top-k over the keys this shard holds (detectors left
        out), padded with PAD_ID / -inf where it holds fewer than k selectable rows. k
        above the table's row count is an error. detectors=m > 0: also the m best
        detectors by cos(q, key) + bias (`SearchResult.detectors`, padded likewise)."""
        with self._use(version) as st, st.lock:
            _tensor("queries", queries, torch.float32, (None, st.config.d_k))
            _check_k(st, k)
            _check_k(st, detectors, "detectors", lo=0)
            q = queries.to(st.device)
            res = _search(st, q, k)
            if detectors:
                res.detectors = _detect(st, q, detectors)
            return res

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None, version: int = 0) -> torch.Tensor:
        """ids [M] int64 (owned or PAD) -> values [M, d_v] in the value dtype (0 at PAD).
        hits [M] int64 >= 0 and weight_sum [M] float64, both or neither: a fetch-mode
        training readout's use of the rows (entries with weight > 0, summed weights),
        recorded as a pushdown readout records its own (usage, this step's balancing load)."""
        with self._use(version) as st, st.lock:
            _tensor("ids", ids, torch.int64, (None,))
            _ids("ids", ids, st.row_start, st.row_end, allow_pad=True)
            _check_usage(ids, hits, weight_sum)
            local = _local(st, ids)
            out = st.values[local.clamp_min(0)]
            out[local < 0] = 0
            if hits is not None:
                keep = local >= 0
                rows, h = local[keep], hits.to(st.device)[keep]
                st.hits.index_add_(0, rows, h)
                st.step_hits.index_add_(0, rows, h)
                st.weight_sum.index_add_(0, rows, weight_sum.to(st.device)[keep])
            return out

    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, version: int = 0) -> torch.Tensor:
        """ids [T, k] (owned or PAD), weights [T, k] fp32 -> [T, d_v] fp32 partial readout."""
        with self._use(version) as st, st.lock:
            local, w = _check_readout(st, ids, weights)
            out = kernels.readout_weighted(st.values, local, w)
            valid = local >= 0
            rows, rw = local[valid], w[valid]
            hit = rows[rw > 0]
            st.hits.index_add_(0, hit, torch.ones_like(hit))
            st.step_hits.index_add_(0, hit, torch.ones_like(hit))
            st.weight_sum.index_add_(0, rows, rw.double())
            return out

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "", version: int = 0) -> torch.Tensor:
        """grad_out [T, d_v] fp32 -> grad of weights [T, k] fp32; accumulates row
        gradients w_j * grad_out for end_step (once per request_id)."""
        with self._use(version) as st, st.lock:
            local, w = _check_readout(st, ids, weights)
            _tensor("grad_out", grad_out, torch.float32, (ids.shape[0], st.config.d_v))
            grad_w, rows, row_grads = kernels.readout_weighted_backward(
                st.values, local, w, grad_out.to(st.device))
            if not st.mark_seen(request_id):
                st.row_grads.append((rows, row_grads))
            return grad_w

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                               request_id: str = "", version: int = 0) -> None:
        """Row gradients computed by the caller (fetch mode): ids [M] (owned or PAD; repeats
        are summed), grads [M, d_v] fp32. Accumulated as readout_backward's are, for end_step
        (once per request_id)."""
        with self._use(version) as st, st.lock:
            _tensor("ids", ids, torch.int64, (None,))
            _tensor("grads", grads, torch.float32, (ids.shape[0], st.config.d_v))
            _ids("ids", ids, st.row_start, st.row_end, allow_pad=True)
            if st.mark_seen(request_id):
                return
            local = _local(st, ids)
            keep = local >= 0
            if bool(keep.any()):
                st.row_grads.append((local[keep], grads.to(st.device)[keep]))

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                             request_id: str = "", version: int = 0) -> None:
        """ids [M] (owned flat rows or PAD), grads [M, d_k] fp32."""
        with self._use(version) as st, st.lock:
            _tensor("ids", ids, torch.int64, (None,))
            _tensor("grads", grads, torch.float32, (ids.shape[0], st.config.d_k))
            _ids("ids", ids, st.row_start, st.row_end, allow_pad=True)
            local = _local(st, ids)
            keep = local >= 0
            pos = st.flat_pos[local[keep]]
            if bool((pos < 0).any()):
                bad = int(ids.to(st.device)[keep][pos < 0][0])
                raise errors.InvalidArgument("ids", f"id {bad} is a product-key row; key gradients are for flat rows")
            if not st.mark_seen(request_id) and pos.numel():
                st.key_grads.append((pos, grads.to(st.device)[keep]))

    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1,
                 request_id: str = "", timeout_s: float = 60.0) -> int:
        """Step barrier. Applies the accumulated gradients once all num_workers
        workers have arrived for `step`; every caller waits until then and gets
        the new step (step + 1). A call for a step already applied (a retry)
        returns at once."""
        _int("step", step, 0)
        _int("num_workers", num_workers, 1)
        _int("worker", worker, 0, num_workers)
        if not timeout_s > 0:
            raise errors.InvalidArgument("timeout_s", f"must be > 0, got {timeout_s}")
        with self._use(0) as st, st.cond:
            if step < st.step:
                return st.step
            if step > st.step:
                raise errors.InvalidArgument("step", f"shard {self.shard_id} is at step {st.step}, "
                                                     f"cannot end step {step}")
            n, arrived = st.arrivals.get(step, (num_workers, set()))
            if n != num_workers:
                raise errors.InvalidArgument("num_workers", f"{num_workers} differs from {n} given by "
                                                            "another worker for this step")
            st.arrivals[step] = (n, arrived)
            arrived.add(worker)
            st.mark_seen(request_id)
            if len(arrived) == n:
                _apply_step(st)
                st.step += 1
                del st.arrivals[step]
                st.cond.notify_all()
            elif not st.cond.wait_for(lambda: st.step > step, timeout_s):
                arrived.discard(worker)  # as if it never came: a retry arrives afresh
                if not arrived:
                    del st.arrivals[step]
                raise BarrierTimeout(f"end_step {step}: {len(arrived)} of {n} workers arrived "
                                     f"within {timeout_s}s (shard {self.shard_id})")
            return step + 1

    # -- control plane -------------------------------------------------------

    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 cue: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Append rows (values [M, d_v], keys [M, d_k], optional selection bias [M],
        default 0, optional cue and gate group labels [M] int64 >= -1, default -1)
        to the table's last flat segment; only the shard holding the table's last
        rows may. -> ids [M]."""
        with self._use(0) as st, st.lock:
            cfg = st.config
            _tensor("values", values, (torch.float32, st.values.dtype), (None, cfg.d_v))
            _tensor("keys", keys, torch.float32, (values.shape[0], cfg.d_k))
            if bias is not None:
                _tensor("bias", bias, torch.float32, (values.shape[0],))
            for name, g in (("cue", cue), ("gate", gate)):
                if g is not None:
                    _tensor(name, g, torch.int64, (values.shape[0],))
                    if bool((g < -1).any()):
                        raise errors.InvalidArgument(name, f"group labels are >= 0 (or -1 for none); got {int(g.min())}")
            if st.row_end != st.segments[-1].row_end:
                raise errors.FailedPrecondition(
                    f"add_rows: shard {self.shard_id} owns [{st.row_start}, {st.row_end}), not the table's "
                    f"last rows (table ends at {st.segments[-1].row_end})")
            _append_rows(st, values.to(st.device), keys.to(st.device), None if bias is None else bias.to(st.device),
                         *(None if g is None else g.to(st.device) for g in (cue, gate)))
            m = values.shape[0]
            return torch.arange(st.row_end - m, st.row_end, dtype=torch.int64)

    def set_frozen(self, ids: torch.Tensor, frozen: bool = True) -> None:
        self._set_mask("frozen", ids, frozen)

    def set_ablated(self, ids: torch.Tensor, ablated: bool = True) -> None:
        self._set_mask("ablated", ids, ablated)

    def _set_mask(self, name: str, ids: torch.Tensor, flag: bool) -> None:
        if not isinstance(flag, bool):
            raise errors.InvalidArgument(name, f"expected a bool, got {type(flag).__name__}")
        with self._use(0) as st, st.lock:
            _tensor("ids", ids, torch.int64, (None,))
            _ids("ids", ids, st.row_start, st.row_end, allow_pad=False)
            getattr(st, name)[_local(st, ids)] = flag
            if name == "ablated" and st.faiss is not None:
                st.faiss.invalidate()

    def usage(self) -> UsageStats:
        """Usage of this shard's rows [row_start, row_end) (CPU tensors)."""
        with self._use(0) as st, st.lock:
            return UsageStats(st.hits.cpu().clone(), st.weight_sum.cpu().clone(),
                              st.frozen.cpu().clone(), st.ablated.cpu().clone())

    def write_snapshot(self, version_dir: str, version: int) -> None:
        """Write this shard's subgroup of a (staged) version. Gradients not yet
        applied by end_step are not part of a snapshot: take it between steps."""
        _int("version", version, 1)
        with self._use(0) as st:
            with st.lock:
                data = _state_to_data(st, version)  # copies, so the write runs unlocked
            persistence.write_shard(version_dir, data)

    # -- for tests and tools -------------------------------------------------

    @property
    def serving_version(self) -> int:
        return self._serving.version

    def held_versions(self) -> dict[str, list[int]]:
        with self._vlock:
            return {"serving": [self._serving.version], "pending": sorted(self._pending),
                    "retiring": [s.version for s in self._retiring]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every persisted tensor of the serving state (for tests)."""
        with self._use(0) as st, st.lock:
            data = _state_to_data(st, st.version)
        return {k: torch.from_numpy(v.copy()) for k, v in data.arrays.items()}


# -- helpers on a state (caller holds st.lock) -----------------------------------

def _local(st: _State, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(st.device)
    return torch.where(ids >= 0, ids - st.row_start, torch.full_like(ids, PAD_ID))


def _check_usage(ids: torch.Tensor, hits: torch.Tensor | None, weight_sum: torch.Tensor | None) -> None:
    """A fetch's usage: hits [M] int64 >= 0 and weight_sum [M] float64, both or neither."""
    if (hits is None) != (weight_sum is None):
        raise errors.InvalidArgument("hits" if hits is None else "weight_sum",
                                     "hits and weight_sum come together (a fetch's usage) or not at all")
    if hits is None:
        return
    _tensor("hits", hits, torch.int64, (ids.shape[0],))
    _tensor("weight_sum", weight_sum, torch.float64, (ids.shape[0],))
    if bool((hits < 0).any()):
        raise errors.InvalidArgument("hits", "counts must be >= 0")


def _check_k(st: _State, k, field: str = "k", lo: int = 1) -> None:
    _int(field, k, lo)
    if st.row_end == st.segments[-1].row_end:
        # the last shard: rows are appended here, so its view of the table is current
        if k > st.row_end:
            raise errors.InvalidArgument(field, f"{field}={k} exceeds the table's {st.row_end} rows")
        if field == "k" and st.searchable_rows() == 0:
            raise errors.InvalidArgument("k", "the table holds no searchable keys (no flat rows, no codebooks)")
    elif k > _MAX_SEARCH_K:
        # another shard's view may predate rows appended since (the table checks k against
        # its own row count): it answers from its own rows, padded, up to a bound on the answer
        raise errors.InvalidArgument(field, f"{field}={k} exceeds {_MAX_SEARCH_K}")


def _check_readout(st: _State, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _tensor("ids", ids, torch.int64, (None, None))
    _tensor("weights", weights, torch.float32, tuple(ids.shape))
    _ids("ids", ids, st.row_start, st.row_end, allow_pad=True)
    return _local(st, ids), weights.to(st.device)


def _search(st: _State, q: torch.Tensor, k: int) -> SearchResult:
    cfg = st.config
    all_s, all_ids, all_keys, all_groups = [], [], [], []
    if st.flat_ids.numel():
        abl = st.ablated[st.flat_local]
        if st.flat_detector is not None:
            abl = abl | st.flat_detector
        if cfg.faiss_threshold and st.flat_ids.numel() >= cfg.faiss_threshold:
            if st.faiss is None:
                st.faiss = FaissFlatIndex(cfg.faiss_factory)
            s, pos = st.faiss.search(q, st.keys, k, st.flat_bias, abl)
        else:
            s, pos = exact_topk(q, st.keys, k, st.flat_bias, abl)
        valid = pos >= 0
        p = pos.clamp_min(0)
        all_s.append(s)
        all_ids.append(torch.where(valid, st.flat_ids[p], torch.full_like(p, PAD_ID)))
        all_keys.append(st.keys[p].float() * valid.unsqueeze(-1))
        if st.labelled:
            all_groups.append(torch.stack([st.flat_cue[p], st.flat_gate[p]], -1).masked_fill(~valid.unsqueeze(-1), -1))
    h = cfg.d_k // 2
    for pc in st.pieces:
        n = pc.seg.n_sub
        # The shard owns first-codebook rows [i0, i1): it searches that slice
        # against the whole second codebook, an exact top-k over its own rows,
        # so the table's search work does not grow with the number of shards.
        lo = pc.local_lo - st.row_start
        abl_rows = st.ablated[lo:lo + (pc.i1 - pc.i0) * n]
        s, sub = kernels.product_key_search(q[:, :h], q[:, h:], pc.codebook_a[pc.i0:pc.i1], pc.codebook_b, k,
                                            pc.bias_a[pc.i0:pc.i1], pc.bias_b,
                                            abl_rows if bool(abl_rows.any()) else None)
        valid = (sub >= 0) & ~torch.isneginf(s)
        sub = sub.clamp_min(0) + pc.i0 * n  # ids within the segment
        ia, ib = sub // n, sub % n
        all_s.append(s.masked_fill(~valid, float("-inf")))
        all_ids.append(torch.where(valid, pc.seg.row_start + sub, torch.full_like(sub, PAD_ID)))
        all_keys.append(torch.cat([pc.codebook_a[ia], pc.codebook_b[ib]], -1).float() * valid.unsqueeze(-1))
        if st.labelled:
            all_groups.append(torch.full((*sub.shape, 2), -1, dtype=torch.int64, device=sub.device))
    if not all_s:  # this shard holds no searchable rows
        B = q.shape[0]
        none = torch.full((B, k), PAD_ID, dtype=torch.int64, device=q.device)
        return SearchResult(none, torch.full((B, k), float("-inf"), device=q.device),
                            torch.zeros(B, k, cfg.d_k, device=q.device), none.clone(), none.clone())
    return merge_topk(torch.cat(all_s, 1), torch.cat(all_ids, 1), torch.cat(all_keys, 1), k,
                      torch.cat(all_groups, 1) if st.labelled else None)


def _detect(st: _State, q: torch.Tensor, m: int) -> Detections:
    """The m best detectors of this shard per query, by cos(q, key) + bias."""
    pos = st.detector_pos
    if not pos.numel():
        return empty_detections(q.shape[0], m, q.device)
    s, sel = exact_topk(torch.nn.functional.normalize(q.float(), dim=-1), st.keys[pos], m, st.flat_bias[pos],
                        st.ablated[st.flat_local[pos]])
    valid = sel >= 0
    p = pos[sel.clamp_min(0)]
    return Detections(torch.where(valid, st.flat_ids[p], torch.full_like(p, PAD_ID)), s,
                      st.flat_cue[p].masked_fill(~valid, -1), st.flat_gate[p].masked_fill(~valid, -1))


def empty_detections(B: int, m: int, device) -> Detections:
    none = torch.full((B, m), PAD_ID, dtype=torch.int64, device=device)
    return Detections(none, torch.full((B, m), float("-inf"), device=device), none.clone(), none.clone())


def merge_detections(parts: list[Detections], m: int) -> Detections:
    """The m best of several shards' detections (each [B, m_i])."""
    s, pos = torch.cat([p.scores for p in parts], 1).topk(m, dim=1)
    pad = torch.isneginf(s)

    def pick(field: str) -> torch.Tensor:
        return torch.cat([getattr(p, field) for p in parts], 1).gather(1, pos).masked_fill(pad, -1)
    return Detections(pick("ids"), s, pick("cue"), pick("gate"))


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor, k: int,
               groups: torch.Tensor | None = None) -> SearchResult:
    """Top-k of candidates [B, C] (C >= k), PAD where the score is -inf. groups [B, C, 2]
    int64: the candidates' (cue, gate) labels (None: every candidate has none)."""
    s, pos = scores.topk(k, dim=1)
    out_ids = ids.gather(1, pos).masked_fill(torch.isneginf(s), PAD_ID)
    out_keys = keys.gather(1, pos.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    out_keys = out_keys * (out_ids >= 0).unsqueeze(-1)
    if groups is None:
        cue = torch.full_like(out_ids, -1)
        return SearchResult(out_ids, s, out_keys, cue, cue.clone())
    g = groups.gather(1, pos.unsqueeze(-1).expand(-1, -1, 2)).masked_fill((out_ids < 0).unsqueeze(-1), -1)
    return SearchResult(out_ids, s, out_keys, g[..., 0].contiguous(), g[..., 1].contiguous())


def _apply_step(st: _State) -> None:
    cfg, opt = st.config, st.config.optimizer
    if st.row_grads:
        rows, grads = _merge_grads(st.row_grads, st.config.d_v)
        sparse_step(opt.kind, st.values, st.opt, rows, grads, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                    frozen=st.frozen)
    if st.key_grads:
        pos, grads = _merge_grads(st.key_grads, st.config.d_k)
        sparse_step(opt.kind, st.keys, st.key_opt, pos, grads, lr=opt.effective_key_lr, betas=opt.betas,
                    eps=opt.eps, frozen=st.frozen[st.flat_local])
        if st.faiss is not None:
            st.faiss.invalidate()
    if cfg.bias_step > 0 and bool(st.step_hits.any()):
        _balance(st)
    st.row_grads, st.key_grads = [], []
    st.step_hits.zero_()


def _merge_grads(pairs: list[tuple[torch.Tensor, torch.Tensor]], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, grads) pairs -> (unique sorted ids, summed grads)."""
    if len(pairs) == 1 and pairs[0][0].numel() <= 1:
        return pairs[0][0], pairs[0][1].float().reshape(-1, dim)
    if len(pairs) == 1 and bool((pairs[0][0][1:] > pairs[0][0][:-1]).all()):
        return pairs[0][0], pairs[0][1].float().reshape(-1, dim)  # already unique and sorted
    ids = torch.cat([p[0] for p in pairs])
    grads = torch.cat([p[1].float() for p in pairs]).reshape(-1, dim)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    out = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=grads.device)
    out.index_add_(0, inverse, grads)
    return uniq, out


def _balance(st: _State) -> None:
    """Loss-free balancing (DeepSeek-V3): move each bias by bias_step against the
    sign of its load error over this step. Load and mean are over this shard's
    rows (ablated rows excluded); selection only, never the weights."""
    step = st.config.bias_step
    if st.flat_ids.numel():
        live = ~st.ablated[st.flat_local]
        if st.flat_detector is not None:        # never read: their load says nothing
            live = live & ~st.flat_detector
        if bool(live.any()):
            load = st.step_hits[st.flat_local].double()
            err = torch.sign(load - load[live].mean()).float() * live
            st.flat_bias -= step * err
            if st.faiss is not None:
                st.faiss.invalidate()
    for pc in st.pieces:
        n = pc.seg.n_sub
        lo = pc.local_lo - st.row_start
        load = st.step_hits[lo:lo + (pc.i1 - pc.i0) * n].double().reshape(-1, n)
        la, lb = load.sum(1), load.sum(0)
        pc.bias_a[pc.i0:pc.i1] -= step * torch.sign(la - la.mean()).float()
        pc.bias_b -= step * torch.sign(lb - lb.mean()).float()


def _append_rows(st: _State, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None,
                 cue: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> None:
    m, start = values.shape[0], st.row_end
    last = st.segments[-1]
    if last.kind == SEGMENT_FLAT:
        st.segments = st.segments[:-1] + (SegmentInfo(SEGMENT_FLAT, last.row_start, last.num_rows + m),)
    else:
        st.segments = st.segments + (SegmentInfo(SEGMENT_FLAT, start, m),)
    st.values = torch.cat([st.values, values.to(st.values.dtype)])
    for name in ("frozen", "ablated", "hits", "weight_sum", "step_hits"):
        t = getattr(st, name)
        setattr(st, name, torch.cat([t, t.new_zeros(m)]))
    st.opt.append(m)
    st.flat_ids = torch.cat([st.flat_ids, torch.arange(start, start + m, device=st.device)])
    st.keys = torch.cat([st.keys, keys.float()])
    st.flat_bias = torch.cat([st.flat_bias, st.flat_bias.new_zeros(m) if bias is None else bias.float()])
    st.flat_cue = torch.cat([st.flat_cue, st.flat_cue.new_full((m,), -1) if cue is None else cue])
    st.flat_gate = torch.cat([st.flat_gate, st.flat_gate.new_full((m,), -1) if gate is None else gate])
    st.labelled = st.labelled or any(g is not None and bool((g >= 0).any()) for g in (cue, gate))
    st.key_opt.append(m)
    st.row_end += m
    st._reindex()


# -- construction, save, load ----------------------------------------------------

def _block_gen(seed: int, stream: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_003 + block)


def _init_rows(cfg: TableConfig, lo: int, hi: int, stream: int, dim: int, scale: float) -> torch.Tensor:
    """Normal(0, scale) rows for global ids [lo, hi), drawn per block of ids so a
    row's initial value does not depend on how the table is sharded."""
    parts = []
    for b in range(lo // _INIT_BLOCK, -(-hi // _INIT_BLOCK)):
        block = torch.randn(_INIT_BLOCK, dim, generator=_block_gen(cfg.seed, stream, b)) * scale
        b0 = b * _INIT_BLOCK
        parts.append(block[max(lo, b0) - b0:min(hi, b0 + _INIT_BLOCK) - b0])
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def _owned_pieces(segments, lo: int, hi: int):
    for si, seg in enumerate(segments):
        if seg.kind != SEGMENT_PRODUCT or seg.row_end <= lo or seg.row_start >= hi:
            continue
        a, b = max(lo, seg.row_start) - seg.row_start, min(hi, seg.row_end) - seg.row_start
        if a % seg.n_sub or b % seg.n_sub:
            raise errors.InvalidArgument("row_range", f"[{lo}, {hi}) splits a product-key row of segment {si} "
                                                      f"(boundaries must be multiples of n_sub={seg.n_sub})")
        yield si, seg, a // seg.n_sub, b // seg.n_sub


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise errors.FailedPrecondition(f"device {name!r} requested but CUDA is not available")
    return dev


def _init_state(cfg: TableConfig, shard_id: int, lo: int, hi: int) -> _State:
    segments = cfg.segment_infos()
    n_rows = segments[-1].row_end
    if not (0 <= lo < hi <= n_rows):
        raise errors.InvalidArgument("row_range", f"[{lo}, {hi}) is not a non-empty range inside [0, {n_rows})")
    dev = _device(cfg.device)
    vdtype = torch.bfloat16 if cfg.value_dtype == "bfloat16" else torch.float32
    values = _init_rows(cfg, lo, hi, 0, cfg.d_v, cfg.init_scale).to(vdtype)
    flat_ids = torch.cat([torch.arange(max(lo, s.row_start), max(lo, s.row_start, min(hi, s.row_end)))
                          for s in segments if s.kind == SEGMENT_FLAT] + [torch.zeros(0, dtype=torch.int64)])
    keys = _init_rows(cfg, lo, hi, 1, cfg.d_k, cfg.key_init_scale)[flat_ids - lo]
    pieces = []
    for si, seg, i0, i1 in _owned_pieces(segments, lo, hi):
        if not cfg.store_codebooks:
            continue
        g = _block_gen(cfg.seed, 2, si)
        ca = torch.randn(seg.n_sub, cfg.d_k // 2, generator=g) * cfg.key_init_scale
        cb = torch.randn(seg.n_sub, cfg.d_k // 2, generator=g) * cfg.key_init_scale
        pieces.append(_ProductPiece(si, seg, i0, i1, ca.to(dev), cb.to(dev),
                                    torch.zeros(seg.n_sub, device=dev), torch.zeros(seg.n_sub, device=dev)))
    R, F = hi - lo, flat_ids.numel()
    return _State(
        config=cfg, shard_id=shard_id, version=0, step=0, row_start=lo, row_end=hi, segments=segments,
        values=values.to(dev), frozen=torch.zeros(R, dtype=torch.bool, device=dev),
        ablated=torch.zeros(R, dtype=torch.bool, device=dev),
        hits=torch.zeros(R, dtype=torch.int64, device=dev), weight_sum=torch.zeros(R, dtype=torch.float64, device=dev),
        opt=RowState.zeros(cfg.optimizer.kind, R, cfg.d_v, dev),
        flat_ids=flat_ids.to(dev), keys=keys.to(dev), flat_bias=torch.zeros(F, device=dev),
        key_opt=RowState.zeros(cfg.optimizer.kind, F, cfg.d_k, dev), pieces=pieces)


def _state_to_data(st: _State, version: int) -> persistence.ShardData:
    """Copies of the state (the caller may write them while the state moves on)."""
    def np_(t):
        return persistence.to_numpy(t).copy()
    arrays = {
        "values": np_(st.values), "frozen": np_(st.frozen), "ablated": np_(st.ablated),
        "hits": np_(st.hits), "weight_sum": np_(st.weight_sum), "opt_steps": np_(st.opt.steps),
        "flat_ids": np_(st.flat_ids), "keys": np_(st.keys), "flat_bias": np_(st.flat_bias),
        "key_steps": np_(st.key_opt.steps), "flat_cue": np_(st.flat_cue), "flat_gate": np_(st.flat_gate),
    }
    if st.opt.m is not None:
        arrays.update(opt_m=np_(st.opt.m), opt_v=np_(st.opt.v), key_m=np_(st.key_opt.m), key_v=np_(st.key_opt.v))
    for pc in st.pieces:
        for name in ("codebook_a", "codebook_b", "bias_a", "bias_b"):
            arrays[f"pk{pc.seg_index}_{name}"] = np_(getattr(pc, name))
    cfg = st.config
    attrs = {
        "shard_id": st.shard_id, "row_start": st.row_start, "row_end": st.row_end, "step": st.step,
        "version": version, "d_k": cfg.d_k, "d_v": cfg.d_v, "value_dtype": cfg.value_dtype,
        "value_storage": "uint16 bits of bfloat16" if cfg.value_dtype == "bfloat16" else "float32",
        "segments": segments_to_json(st.segments), "config": cfg.to_dict(),
    }
    return persistence.ShardData(attrs, arrays)


def _load_state(store_root: str, version: int, shard_id: int, device: str | None) -> _State:
    data = persistence.read_shard(persistence.version_path(store_root, version), shard_id)
    a, arr = data.attrs, data.arrays
    cfg = TableConfig.from_dict(a["config"])
    if device is not None:
        cfg.device = device
    dev = _device(cfg.device)

    def t(name, dtype=None):
        return persistence.from_numpy(arr[name], dtype).to(dev)

    segments = segments_from_json(a["segments"])
    lo, hi = a["row_start"], a["row_end"]
    adam = "opt_m" in arr
    pieces = []
    for si, seg, i0, i1 in _owned_pieces(segments, lo, hi):
        if f"pk{si}_codebook_a" in arr:
            pieces.append(_ProductPiece(si, seg, i0, i1, t(f"pk{si}_codebook_a"), t(f"pk{si}_codebook_b"),
                                        t(f"pk{si}_bias_a"), t(f"pk{si}_bias_b")))
    return _State(
        config=cfg, shard_id=shard_id, version=version, step=a["step"], row_start=lo, row_end=hi,
        segments=segments, values=t("values", a["value_dtype"]), frozen=t("frozen"), ablated=t("ablated"),
        hits=t("hits"), weight_sum=t("weight_sum"),
        opt=RowState(t("opt_steps"), t("opt_m") if adam else None, t("opt_v") if adam else None),
        flat_ids=t("flat_ids"), keys=t("keys"), flat_bias=t("flat_bias"),
        key_opt=RowState(t("key_steps"), t("key_m") if adam else None, t("key_v") if adam else None),
        pieces=pieces, flat_cue=t("flat_cue") if "flat_cue" in arr else None,
        flat_gate=t("flat_gate") if "flat_gate" in arr else None)
