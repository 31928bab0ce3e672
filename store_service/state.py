"""The data of one version of a shard (`ShardState`), how a fresh one is initialised,
and its conversion to and from what `persistence` writes.

Concurrency: every read and write of a state holds `state.lock` (the `Shard`
takes it), so a reader never sees half an optimizer step.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch

from . import errors, persistence
from .config import TableConfig, segments_from_json, segments_to_json
from .flat_index import FaissFlatIndex
from .interface import PAD_ID, SEGMENT_FLAT, SEGMENT_PRODUCT, TAG_UNSET, SegmentInfo
from .optimizer import RowState

_INIT_BLOCK = 4096        # initial rows are drawn per block of global ids: independent of sharding
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
        self.key_grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat positions, grads)
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.arrivals: dict = {}               # step -> step.Round (the workers waiting at it)
        self.pending_grad_bytes = 0            # bytes in row_grads and key_grads (bounded per step)
        self.nonfinite_refused = 0             # steps refused for a non-finite result
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.inflight = 0
        self.faiss: FaissFlatIndex | None = None
        self.reindex()

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


def init_state(cfg: TableConfig, shard_id: int, lo: int, hi: int) -> ShardState:
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
        pieces.append(ProductPiece(si, seg, i0, i1, ca.to(dev), cb.to(dev),
                                   torch.zeros(seg.n_sub, device=dev), torch.zeros(seg.n_sub, device=dev)))
    R, F = hi - lo, flat_ids.numel()
    return ShardState(
        config=cfg, shard_id=shard_id, version=0, step=0, row_start=lo, row_end=hi, segments=segments,
        values=values.to(dev), frozen=torch.zeros(R, dtype=torch.bool, device=dev),
        ablated=torch.zeros(R, dtype=torch.bool, device=dev),
        hits=torch.zeros(R, dtype=torch.int64, device=dev), weight_sum=torch.zeros(R, dtype=torch.float64, device=dev),
        opt=RowState.zeros(cfg.optimizer.kind, R, cfg.d_v, dev),
        flat_ids=flat_ids.to(dev), keys=keys.to(dev), flat_bias=torch.zeros(F, device=dev),
        key_opt=RowState.zeros(cfg.optimizer.kind, F, cfg.d_k, dev), pieces=pieces)


# -- to and from persistence -------------------------------------------------------------

def state_to_data(st: ShardState, version: int) -> persistence.ShardData:
    """Copies of the state (the caller may write them while the state moves on)."""
    def np_(t):
        return persistence.to_numpy(t).copy()
    arrays = {
        "values": np_(st.values), "frozen": np_(st.frozen), "ablated": np_(st.ablated),
        "hits": np_(st.hits), "weight_sum": np_(st.weight_sum), "opt_steps": np_(st.opt.steps),
        "flat_ids": np_(st.flat_ids), "keys": np_(st.keys), "flat_bias": np_(st.flat_bias),
        "key_steps": np_(st.key_opt.steps), "flat_partition": np_(st.partition),
    }
    arrays.update({persistence.tag_array_name(name): np_(t) for name, t in st.tags.items()})
    if st.opt.m is not None:
        arrays.update(opt_m=np_(st.opt.m), opt_v=np_(st.opt.v), key_m=np_(st.key_opt.m), key_v=np_(st.key_opt.v))
    for pc in st.pieces:
        for name in ("codebook_a", "codebook_b", "bias_a", "bias_b"):
            arrays[f"pk{pc.seg_index}_{name}"] = np_(getattr(pc, name))
    cfg = st.config
    attrs = {
        "format": persistence.FORMAT,
        "shard_id": st.shard_id, "row_start": st.row_start, "row_end": st.row_end, "step": st.step,
        "version": version, "d_k": cfg.d_k, "d_v": cfg.d_v, "value_dtype": cfg.value_dtype,
        "value_storage": "uint16 bits of bfloat16" if cfg.value_dtype == "bfloat16" else "float32",
        "segments": segments_to_json(st.segments), "config": cfg.to_dict(),
    }
    return persistence.ShardData(attrs, arrays)


def load_state(store_root: str, version: int, shard_id: int, device: str | None) -> ShardState:
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
            pieces.append(ProductPiece(si, seg, i0, i1, t(f"pk{si}_codebook_a"), t(f"pk{si}_codebook_b"),
                                       t(f"pk{si}_bias_a"), t(f"pk{si}_bias_b")))
    return ShardState(
        config=cfg, shard_id=shard_id, version=version, step=a["step"], row_start=lo, row_end=hi,
        segments=segments, values=t("values", a["value_dtype"]), frozen=t("frozen"), ablated=t("ablated"),
        hits=t("hits"), weight_sum=t("weight_sum"),
        opt=RowState(t("opt_steps"), t("opt_m") if adam else None, t("opt_v") if adam else None),
        flat_ids=t("flat_ids"), keys=t("keys"), flat_bias=t("flat_bias"),
        key_opt=RowState(t("key_steps"), t("key_m") if adam else None, t("key_v") if adam else None),
        pieces=pieces, tags={name: t(array) for name, array in persistence.tag_arrays(arr).items()},
        partition=t("flat_partition"))
