"""Configuration of a knowledge table, and how its rows are split over shards.

A size is one `TableConfig`; everything derivable (row counts, segment
offsets, shard row ranges) is derived here and nowhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import errors
from .interface import SEGMENT_FLAT, SEGMENT_PRODUCT, SegmentInfo
from .optimizer import OptimizerConfig, RowOptimizer, resolve_kind

__all__ = ["VALUE_DTYPES", "OptimizerConfig", "RowOptimizer", "TableConfig", "segment_infos", "segments_to_json",
           "segments_from_json", "partition_rows"]

VALUE_DTYPES = ("float32", "bfloat16")


@dataclass
class TableConfig:
    d_k: int
    d_v: int
    # ("product", n_sub) -> n_sub**2 rows; ("flat", num_rows). Ids run through them in order.
    segments: list[tuple[str, int]] = field(default_factory=lambda: [("flat", 1024)])
    value_dtype: str = "float32"
    # Store-side product search (interface.py, "Product search on the store"): the shards
    # hold the product segments' codebooks and sub-key biases and search product rows
    # themselves, so one `search` covers every row. Off (the default): the model keeps
    # the codebooks as its own parameters and searches product rows on the worker with
    # `kernels.product_key_search`; the store searches flat rows only.
    store_codebooks: bool = False
    num_shards: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Loss-free balancing: after each step b_i -= bias_step * sign(load_i - mean load).
    bias_step: float = 1e-3
    init_scale: float = 0.02            # std of initial values
    key_init_scale: float | None = None  # std of initial keys / sub-keys; None -> d_k**-0.5
    seed: int = 0
    device: str = "cpu"                 # "cpu" | "cuda" | "cuda:N"
    # Rows in host memory (device "cpu") serving a GPU worker: page-locked, so fetched rows
    # reach the GPU by an asynchronous copy (store_service/host_rows.py). Ignored where CUDA
    # is not available (nothing to pin for) and on a CUDA device.
    pin_memory: bool = False
    # Flat search: a shard whose flat rows number at least this uses faiss
    # (IndexFlatIP unless faiss_factory says otherwise); 0 = always exact.
    faiss_threshold: int = 0
    faiss_factory: str = "Flat"

    def __post_init__(self):
        if isinstance(self.optimizer, dict):
            self.optimizer = OptimizerConfig(**self.optimizer)
        self.segments = [(str(kind), int(n)) for kind, n in self.segments]
        if self.key_init_scale is None:
            self.key_init_scale = float(self.d_k) ** -0.5
        if self.d_k < 1 or self.d_v < 1:
            raise errors.InvalidArgument("d_k", f"d_k and d_v must be >= 1, got {self.d_k}, {self.d_v}")
        if self.value_dtype not in VALUE_DTYPES:
            raise errors.InvalidArgument("value_dtype", f"must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if not self.segments:
            raise errors.InvalidArgument("segments", "a table needs at least one segment")
        for kind, n in self.segments:
            if kind not in (SEGMENT_PRODUCT, SEGMENT_FLAT):
                raise errors.InvalidArgument("segments", f"unknown segment kind {kind!r}")
            if n < 1:
                raise errors.InvalidArgument("segments", f"segment size must be >= 1, got {n}")
            if kind == SEGMENT_PRODUCT and self.d_k % 2:
                raise errors.InvalidArgument("d_k", "product keys split d_k in two halves: d_k must be even")
        if self.num_shards < 1:
            raise errors.InvalidArgument("num_shards", f"must be >= 1, got {self.num_shards}")
        # "auto" -> the kind for this table's size (optimizer.py: row-wise for large tables)
        self.optimizer = resolve_kind(self.optimizer, self.num_rows, self.d_v, self.value_dtype)

    def segment_infos(self) -> tuple[SegmentInfo, ...]:
        return segment_infos(self.segments)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.segment_infos())

    def shard_ranges(self) -> list[tuple[int, int]]:
        return partition_rows(self.segment_infos(), self.num_shards)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["segments"] = [list(s) for s in self.segments]
        d["optimizer"]["betas"] = list(self.optimizer.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TableConfig":
        d = dict(d)
        d["optimizer"] = OptimizerConfig(**d["optimizer"])
        return cls(**d)


def segment_infos(spec: list[tuple[str, int]]) -> tuple[SegmentInfo, ...]:
    out, start = [], 0
    for kind, n in spec:
        rows = n * n if kind == SEGMENT_PRODUCT else n
        out.append(SegmentInfo(kind, start, rows, n if kind == SEGMENT_PRODUCT else 0))
        start += rows
    return tuple(out)


def segments_to_json(segments: tuple[SegmentInfo, ...]) -> list[dict]:
    return [dataclasses.asdict(s) for s in segments]


def segments_from_json(data: list[dict]) -> tuple[SegmentInfo, ...]:
    return tuple(SegmentInfo(**d) for d in data)


def partition_rows(segments: tuple[SegmentInfo, ...], num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty row ranges of near-equal size. A boundary inside a
    product segment is moved to a multiple of n_sub from the segment start, so
    every shard owns whole first-codebook rows (its product search stays exact)."""
    num_rows = sum(s.num_rows for s in segments)
    bounds = [0]
    for s in range(1, num_shards):
        b = round(s * num_rows / num_shards)
        for seg in segments:
            if seg.kind == SEGMENT_PRODUCT and seg.row_start < b < seg.row_end:
                b = seg.row_start + seg.n_sub * round((b - seg.row_start) / seg.n_sub)
        bounds.append(max(b, bounds[-1]))
    bounds.append(num_rows)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if any(lo >= hi for lo, hi in ranges):
        raise errors.InvalidArgument(
            "num_shards", f"cannot split {num_rows} rows into {num_shards} non-empty shards "
                          "aligned to product-key rows")
    return ranges
