"""The data of one version of a shard (`ShardState`), how a fresh one is initialised,
and its conversion to and from what `persistence` writes.

Concurrency: every read and write of a state holds `state.lock` (the `Shard`
takes it), so a reader never sees half an optimizer step.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import torch

from . import errors, persistence, snapshots
from .config import TableConfig, segments_from_json, segments_to_json
from .flat_index import FaissFlatIndex
from .interface import PAD_ID, SEGMENT_FLAT, SEGMENT_PRODUCT, TAG_UNSET, SegmentInfo
from .init_rows import block_gen, draw_rows
from .optimizer import RowState

_MAX_SEEN_REQUESTS = 1 << 16


@dataclass
class ProductPiece:
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


class ShardState:
    """One version of a shard's data, with its lock, accumulators and barrier."""

    def __init__(self, *, config: TableConfig, shard_id: int, version: int, step: int,
                 row_start: int, row_end: int, segments: tuple[SegmentInfo, ...],
                 values: torch.Tensor, frozen: torch.Tensor, ablated: torch.Tensor,
                 hits: torch.Tensor, weight_sum: torch.Tensor, opt: RowState,
                 flat_ids: torch.Tensor, keys: torch.Tensor, flat_bias: torch.Tensor, key_opt: RowState,
                 pieces: list[ProductPiece], tags: dict[str, torch.Tensor] | None = None,
                 partition: torch.Tensor | None = None):
        self.config, self.shard_id, self.version, self.step = config, shard_id, version, step
        self.row_start, self.row_end, self.segments = row_start, row_end, segments
        self.values, self.frozen, self.ablated = values, frozen, ablated            # [R, d_v], [R], [R]
        self.hits, self.weight_sum, self.opt = hits, weight_sum, opt                # [R] int64, [R] f64
        self.flat_ids, self.keys, self.flat_bias = flat_ids, keys, flat_bias        # [F], [F, d_k], [F]
        self.tags: dict[str, torch.Tensor] = dict(tags or {})                       # name -> [F] int64, -1 unset
        self.partition = torch.zeros_like(flat_ids) if partition is None else partition  # [F] int64 >= 0
        self.key_opt, self.pieces = key_opt, pieces
        self.step_hits = torch.zeros_like(hits)   # load since the last end_step (balancing)
        self.row_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (local rows, grads) pairs
        self.row_grads_sorted = True           # every pair's rows sorted and unique (readout_backward's are)
        self.key_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat positions, grads)
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.arrivals: dict = {}               # step -> step.Round (the workers waiting at it)
        self.pending_grad_bytes = 0            # bytes in row_grads and key_grads (bounded per step)
        self.nonfinite_refused = 0             # steps refused for a non-finite result
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.inflight = 0
        self.faiss: FaissFlatIndex | None = None
        self._frozen_seen: torch.Tensor | None = None   # the mask has_frozen_rows last read
        self._frozen_any = False
        # Rows changed since `base` (the published version this state's data equals but for
        # them), for incremental snapshots (`snapshots`). Every writer of a persisted row marks
        # it; `dense` names arrays changed wholesale.
        self.dirty = torch.zeros(row_end - row_start, dtype=torch.bool, device=values.device)
        self.dense: set[str] = set()
        self.base = None      # snapshots.Base | None
        self.pending = None   # snapshots.Pending | None: the last snapshot written, maybe not published
        self.reindex()

    def mark_rows(self, local_rows: torch.Tensor) -> None:
        """Local rows [M] (no PAD) whose persisted data changed."""
        if self.dirty.device != local_rows.device:   # the state moved (a swap staged on the host)
            self.dirty = self.dirty.to(local_rows.device)
        self.dirty[local_rows] = True

    def mark_rows_where(self, local_rows: torch.Tensor, keep: torch.Tensor) -> None:
        """mark_rows(local_rows[keep]) without picking them out (on CUDA a boolean mask makes
        the host wait for the device): the rows not kept are set in a scratch slot past the end."""
        if self.dirty.device != local_rows.device:
            self.dirty = self.dirty.to(local_rows.device)
        n = self.dirty.numel()
        touched = torch.zeros(n + 1, dtype=torch.bool, device=self.dirty.device)
        touched.index_fill_(0, torch.where(keep, local_rows, n), True)
        self.dirty |= touched[:n]

    def mark_flat(self, flat_pos: torch.Tensor) -> None:
        """Flat positions [M] whose persisted data changed."""
        self.mark_rows(self.flat_local[flat_pos])

    def mark_dense(self, name: str) -> None:
        """Array `name` changed in (nearly) every row."""
        self.dense.add(name)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def is_last(self) -> bool:
        """Whether this shard holds the table's last rows (where rows are appended)."""
        return self.row_end == self.segments[-1].row_end

    def reindex(self) -> None:
        """Recompute what is derived from the flat rows (after they changed)."""
        self._tag_rows: dict[str, int] | None = None
        # local row -> position among flat rows (-1 for product rows)
        self.flat_pos = torch.full((self.num_rows,), -1, dtype=torch.int64, device=self.device)
        self.flat_local = self.flat_ids - self.row_start
        self.flat_pos[self.flat_local] = torch.arange(self.flat_ids.numel(), device=self.device)
        # rows of partitions >= 1: out of the top-k and of balancing, searched by side queries
        outside = self.partition != 0
        self.outside_top_k = outside if bool(outside.any()) else None   # [F] bool, None when there are none
        # partition p >= 1 -> its rows' flat positions [P_p], ascending (one sort, however many partitions)
        pos = torch.nonzero(outside).flatten()
        order = torch.argsort(self.partition[pos], stable=True)
        parts, counts = torch.unique_consecutive(self.partition[pos][order], return_counts=True)
        self.partition_pos = dict(zip(parts.tolist(), torch.split(pos[order], counts.tolist())))
        if self.faiss is not None:
            self.faiss.invalidate()

    def searchable_rows(self) -> int:
        """Rows of the whole table that search covers (as this version knows the table)."""
        return sum(s.num_rows for s in self.segments
                   if s.kind == SEGMENT_FLAT or (s.kind == SEGMENT_PRODUCT and self.config.store_codebooks))

    def move_to(self, device: torch.device | str) -> None:
        """Every tensor of this version onto `device` (the caller holds the lock): a hot swap
        staged on the host settles on the GPU once the old version is gone."""
        dev = torch.device(device)

        def mv(t):
            return t.to(dev)
        for name in ("values", "frozen", "ablated", "hits", "weight_sum", "flat_ids", "keys", "flat_bias",
                     "partition", "step_hits"):
            setattr(self, name, mv(getattr(self, name)))
        for opt in (self.opt, self.key_opt):
            for name, t in opt.tensors().items():
                setattr(opt, name, mv(t))
        self.tags = {name: mv(t) for name, t in self.tags.items()}
        for pc in self.pieces:
            for name in ("codebook_a", "codebook_b", "bias_a", "bias_b"):
                setattr(pc, name, mv(getattr(pc, name)))
        self.row_grads = [(mv(r), mv(g)) for r, g in self.row_grads]
        self.key_grads = [(mv(r), mv(g)) for r, g in self.key_grads]
        self.config = dataclasses.replace(self.config, device=str(dev))
        self.reindex()

    def drop_data(self) -> None:
        """Free this version's rows now (values, keys, their optimizer state, pending grads),
        not when its last reference goes: a request that has just finished still holds the
        state in its frame for a moment after its in-flight count drops, and a hot swap staged
        on the host must not move the new version onto the device while the old rows are
        still there (release_version calls this once the version is drained)."""
        def empty(t):
            return t.new_empty((0, *t.shape[1:])) if t.dim() else t
        self.values, self.keys = empty(self.values), empty(self.keys)
        for opt in (self.opt, self.key_opt):
            for name, t in opt.tensors().items():
                setattr(opt, name, empty(t))
        self.row_grads, self.key_grads = [], []

    def memory(self) -> dict:
        """Bytes this version holds, by kind, and where its rows live. optimizer_bytes counts
        every optimizer tensor (rows' and flat keys', step counts included)."""
        def nb(t):
            return t.numel() * t.element_size()
        value_bytes = nb(self.values)
        opt_bytes = self.opt.nbytes() + self.key_opt.nbytes()
        return {"device": str(self.device), "pinned": bool(self.values.device.type == "cpu"
                                                           and torch.cuda.is_available() and self.values.is_pinned()),
                "rows": self.num_rows, "value_bytes": value_bytes, "key_bytes": nb(self.keys),
                "optimizer": self.config.optimizer.kind, "optimizer_bytes": opt_bytes,
                "optimizer_over_values": opt_bytes / max(value_bytes, 1)}

    def tag_rows(self) -> dict[str, int]:
        # cached until the flat rows change (reindex): describe() runs before every remote end step
        if self._tag_rows is None:
            self._tag_rows = {name: int((t != TAG_UNSET).sum()) for name, t in sorted(self.tags.items())}
        return dict(self._tag_rows)

    def partition_rows(self) -> dict[int, int]:
        return {p: int(pos.numel()) for p, pos in sorted(self.partition_pos.items())}

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Global ids (owned or PAD) -> local rows (PAD stays -1), on the state's device."""
        ids = ids.to(self.device)
        return torch.where(ids >= 0, ids - self.row_start, torch.full_like(ids, PAD_ID))

    def has_frozen_rows(self) -> bool:
        """Whether any row is frozen: read from the device once per mask (a new tensor, or one
        `frozen_changed` was told of), not at every step (on CUDA each read waits for the device)."""
        if self._frozen_seen is not self.frozen:
            self._frozen_any, self._frozen_seen = bool(self.frozen.any()), self.frozen
        return self._frozen_any

    def frozen_changed(self) -> None:
        """The frozen mask was written in place."""
        self._frozen_seen = None

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


# -- a fresh state ---------------------------------------------------------------------

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


def init_state(cfg: TableConfig, shard_id: int, lo: int, hi: int) -> ShardState:
    segments = cfg.segment_infos()
    n_rows = segments[-1].row_end
    if not (0 <= lo < hi <= n_rows):
        raise errors.InvalidArgument("row_range", f"[{lo}, {hi}) is not a non-empty range inside [0, {n_rows})")
    dev = _device(cfg.device)
    vdtype = torch.bfloat16 if cfg.value_dtype == "bfloat16" else torch.float32
    # streamed: block by block into the destination (init_rows.py)
    values = draw_rows(cfg.seed, 0, cfg.d_v, cfg.init_scale, [(lo, hi)], dtype=vdtype, device=dev,
                       pin_memory=cfg.pin_memory)
    flat = [(max(lo, s.row_start), min(hi, s.row_end)) for s in segments
            if s.kind == SEGMENT_FLAT and max(lo, s.row_start) < min(hi, s.row_end)]
    flat_ids = torch.cat([torch.arange(a, b) for a, b in flat] + [torch.zeros(0, dtype=torch.int64)])
    keys = draw_rows(cfg.seed, 1, cfg.d_k, cfg.key_init_scale, flat, device=dev)
    pieces = []
    for si, seg, i0, i1 in _owned_pieces(segments, lo, hi):
        if not cfg.store_codebooks:
            continue
        g = block_gen(cfg.seed, 2, si)
        ca = torch.randn(seg.n_sub, cfg.d_k // 2, generator=g) * cfg.key_init_scale
        cb = torch.randn(seg.n_sub, cfg.d_k // 2, generator=g) * cfg.key_init_scale
        pieces.append(ProductPiece(si, seg, i0, i1, ca.to(dev), cb.to(dev),
                                   torch.zeros(seg.n_sub, device=dev), torch.zeros(seg.n_sub, device=dev)))
    R, F = hi - lo, flat_ids.numel()
    return ShardState(
        config=cfg, shard_id=shard_id, version=0, step=0, row_start=lo, row_end=hi, segments=segments,
        values=values, frozen=torch.zeros(R, dtype=torch.bool, device=dev),
        ablated=torch.zeros(R, dtype=torch.bool, device=dev),
        hits=torch.zeros(R, dtype=torch.int64, device=dev), weight_sum=torch.zeros(R, dtype=torch.float64, device=dev),
        opt=RowState.zeros(cfg.optimizer.kind, R, cfg.d_v, dev),
        flat_ids=flat_ids.to(dev), keys=keys, flat_bias=torch.zeros(F, device=dev),
        key_opt=RowState.zeros(cfg.optimizer.kind, F, cfg.d_k, dev), pieces=pieces)


# -- to and from persistence -------------------------------------------------------------

def state_tensors(st: ShardState) -> dict[str, torch.Tensor]:
    """Every persisted array of the state, by its name in a version (no copies)."""
    out = {
        "values": st.values, "frozen": st.frozen, "ablated": st.ablated,
        "hits": st.hits, "weight_sum": st.weight_sum,
        "flat_ids": st.flat_ids, "keys": st.keys, "flat_bias": st.flat_bias, "flat_partition": st.partition,
    }
    out.update(st.opt.to_arrays("opt"))
    out.update(st.key_opt.to_arrays("key"))
    out.update({persistence.tag_array_name(name): t for name, t in st.tags.items()})
    for pc in st.pieces:
        for name in ("codebook_a", "codebook_b", "bias_a", "bias_b"):
            out[f"pk{pc.seg_index}_{name}"] = getattr(pc, name)
    return out


def state_attrs(st: ShardState, version: int) -> dict:
    cfg = st.config
    return {
        "format": persistence.FORMAT,
        "shard_id": st.shard_id, "row_start": st.row_start, "row_end": st.row_end, "step": st.step,
        "version": version, "d_k": cfg.d_k, "d_v": cfg.d_v, "value_dtype": cfg.value_dtype,
        "value_storage": "uint16 bits of bfloat16" if cfg.value_dtype == "bfloat16" else "float32",
        "segments": segments_to_json(st.segments), "config": cfg.to_dict(),
    }


def host_copy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of `t` (bf16 as uint16 bits) that the state moving on does not change:
    a device tensor's trip to the host is that copy; a CPU tensor is copied."""
    a = persistence.to_numpy(t)
    return a.copy() if t.device.type == "cpu" else a


def state_to_data(st: ShardState, version: int) -> persistence.ShardData:
    """Copies of the state (the caller may write them while the state moves on)."""
    return persistence.ShardData(state_attrs(st, version),
                                 {n: host_copy(t) for n, t in state_tensors(st).items()})


def _placed(t: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """Host rows page-locked when asked and CUDA is there to use them."""
    if pin_memory and t.device.type == "cpu" and torch.cuda.is_available() and not t.is_pinned():
        return t.pin_memory()
    return t


def load_state(store_root: str, version: int, shard_id: int, device: str | None,
               pin_memory: bool | None = None) -> ShardState:
    """The state of a published version, read in parallel straight onto its device."""
    vdir = persistence.version_path(store_root, version)
    stored = persistence.shard_attrs(vdir, shard_id)
    if stored is None:
        raise errors.NotFound(f"shard {shard_id} not in {vdir}")
    cfg = TableConfig.from_dict(stored["config"])
    if device is not None:
        cfg.device = device
    if pin_memory is not None:
        cfg.pin_memory = pin_memory
    dev = _device(cfg.device)
    a, arr, _ = persistence.read_shard_tensors(vdir, shard_id, dev)

    def t(name, dtype=None):
        return arr[name].view(torch.bfloat16) if dtype == "bfloat16" else arr[name]

    def maybe(name):
        return t(name) if name in arr else None

    segments = segments_from_json(a["segments"])
    lo, hi = a["row_start"], a["row_end"]
    values = t("values", a["value_dtype"])
    if tuple(values.shape) != (hi - lo, cfg.d_v):
        # e.g. bfloat16 bits (uint16) shifted by a float: float64, read back 4x as wide. Served,
        # such rows would overrun a caller's staging slot (fetch_into's out= resizes its view).
        raise errors.DataLoss(f"{vdir}/{persistence.shard_group_name(shard_id)}/values",
                              f"shape {list(values.shape)}, expected [{hi - lo}, {cfg.d_v}] {a['value_dtype']}")
    pieces = []
    for si, seg, i0, i1 in _owned_pieces(segments, lo, hi):
        if f"pk{si}_codebook_a" in arr:
            pieces.append(ProductPiece(si, seg, i0, i1, t(f"pk{si}_codebook_a"), t(f"pk{si}_codebook_b"),
                                       t(f"pk{si}_bias_a"), t(f"pk{si}_bias_b")))
    st = ShardState(
        config=cfg, shard_id=shard_id, version=version, step=a["step"], row_start=lo, row_end=hi,
        segments=segments, values=_placed(values, cfg.pin_memory), frozen=t("frozen"), ablated=t("ablated"),
        hits=t("hits"), weight_sum=t("weight_sum"),
        opt=RowState.from_arrays("opt", maybe),
        flat_ids=t("flat_ids"), keys=t("keys"), flat_bias=t("flat_bias"),
        key_opt=RowState.from_arrays("key", maybe),
        pieces=pieces, tags={name: t(array) for name, array in persistence.tag_arrays(arr).items()},
        partition=t("flat_partition"))
    st.base = snapshots.base_of(store_root, version, stored)
    return st
