"""The one interface through which a caller reaches a knowledge table.

Two things implement `KnowledgeTable`: the in-process `store_service.table.Table`
over `Shard` objects, and the same `Table` over `RemoteShard` gRPC handles
(`store_service.client`). A caller cannot tell them apart.

Conventions (DESIGN.md sections 2, 3, 5):
- Row ids are global int64 in [0, num_rows). Id -1 is padding: it selects
  nothing, contributes nothing to a readout and receives no gradient.
- A table is a list of segments, each a contiguous id range with one key kind:
  "product" (two codebooks of n sub-keys, n^2 rows, row id = start + i*n + j)
  or "flat" (one key per row, stored with the row on its shard).
- A shard owns one contiguous id range [row_start, row_end).
- Readout weights are post-softmax weights w. Pushdown readout returns
  sum_j w_j v_{ids_j}; its backward takes dL/dr, accumulates
  dL/dv_{ids_j} += w_j dL/dr on the owning shard and returns dL/dw_j = dL/dr . v_{ids_j}.
  The softmax itself lives with the caller, because a token's k rows can
  span several shards.
- Balancing bias b_i affects selection only. Flat rows carry a per-row bias on
  their shard; product-key rows a per-sub-key bias (b_i + b_j), which keeps the
  O(n) exact search exact.

Tags and partitions (flat rows only; what they mean is the caller's business):
- A row carries any number of named int64 tags, -1 = unset. Names match
  `^[a-z][a-z0-9_]{0,31}$`, at most 16 per table. Product rows have every tag
  unset. `search(..., tags=names)` returns the selected rows' tags; a `TagFilter`
  restricts a search to rows whose tag is set (to one of some values).
- A row has a partition, an int64 >= 0 (product rows: 0). Partition 0 is what a
  search's top-k reads. Rows of a partition p >= 1 are never in the top-k, are
  left out of balancing (their bias stays where the caller put it) and are
  searched only by a `SideQuery` naming p, scored by cos(query, key) + bias
  (the query normalised by the store, keys as stored), in the same call.

Product search on the store (`TableConfig.store_codebooks`): by default the
model keeps the product codebooks as its parameters and searches product rows
itself (`kernels.product_key_search`); the store's `search` then covers flat rows
only. With store_codebooks the shards hold the codebooks and sub-key biases too
(balanced like flat biases), and `search` returns one exact top-k over every row:
each shard searches its slice of the first codebook against the whole second one,
with the same kernel, so a table of many product rows is searched where its rows
live and the caller needs no codebooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch

from .optimizer import OptimizerConfig, RowOptimizer

PAD_ID = -1
TAG_UNSET = -1

SEGMENT_PRODUCT = "product"
SEGMENT_FLAT = "flat"


@dataclass(frozen=True)
class SegmentInfo:
    kind: str  # SEGMENT_PRODUCT or SEGMENT_FLAT
    row_start: int
    num_rows: int
    n_sub: int = 0  # product segments: sub-keys per codebook; num_rows == n_sub**2

    @property
    def row_end(self) -> int:
        return self.row_start + self.num_rows


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    row_start: int
    row_end: int
    version: int
    step: int
    address: str = ""  # host:port for a remote shard, "" in-process
    tag_rows: dict[str, int] = field(default_factory=dict)        # per tag name held: flat rows with it set
    partition_rows: dict[int, int] = field(default_factory=dict)  # per partition >= 1 with rows: its rows

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class TableInfo:
    d_k: int
    d_v: int
    num_rows: int
    value_dtype: str  # "float32" or "bfloat16"
    segments: tuple[SegmentInfo, ...]
    shards: tuple[ShardInfo, ...]

    @property
    def version(self) -> int:
        return max(s.version for s in self.shards)

    @property
    def step(self) -> int:
        return min(s.step for s in self.shards)

    @property
    def tag_rows(self) -> dict[str, int]:
        """Per tag name held by some shard: flat rows with it set, over all shards."""
        return _summed(s.tag_rows for s in self.shards)

    @property
    def partition_rows(self) -> dict[int, int]:
        """Per partition >= 1 with rows: its rows, over all shards."""
        return _summed(s.partition_rows for s in self.shards)


def _summed(counts) -> dict:
    out: dict = {}
    for c in counts:
        for key, n in c.items():
            out[key] = out.get(key, 0) + n
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class TagFilter:
    """A search considers only flat rows whose tag `name` is set, and, when `values`
    is non-empty, one of `values`. It applies to the top-k and to a side query alike."""
    name: str
    values: tuple[int, ...] = ()


@dataclass(frozen=True)
class SideQuery:
    """A second top-k in the same search call (same round trip): the k best rows of
    `partition` (>= 1) by cos(query, key) + bias."""
    partition: int
    k: int


@dataclass
class SearchResult:
    ids: torch.Tensor     # [B, k] int64, PAD_ID where fewer than k rows exist
    scores: torch.Tensor  # [B, k] float32, the selection score (-inf at PAD)
    keys: torch.Tensor | None  # [B, k, d_k] float32, the selected rows' keys (0 at PAD); None unless asked
    tags: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, k] int64 (-1: unset, and at PAD)
    side: "SearchResult | None" = None  # with search(..., side=SideQuery(...)): ids, scores, tags [B, m]

    def to(self, device) -> "SearchResult":
        return SearchResult(self.ids.to(device), self.scores.to(device),
                            None if self.keys is None else self.keys.to(device),
                            {name: t.to(device) for name, t in self.tags.items()},
                            None if self.side is None else self.side.to(device))


@dataclass
class UsageStats:
    hits: torch.Tensor        # [N] int64: times a row was read out (weight > 0)
    weight_sum: torch.Tensor  # [N] float64: summed readout weight per row
    frozen: torch.Tensor      # [N] bool
    ablated: torch.Tensor     # [N] bool


@runtime_checkable
class KnowledgeTable(Protocol):
    """What a caller may do with a table. Every call is batched."""

    def info(self) -> TableInfo: ...

    # -- data plane -------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int, *, tags: Sequence[str] = (), where: TagFilter | None = None,
               side: SideQuery | None = None, want_keys: bool = False) -> SearchResult:
        """queries [B, d_k] -> top-k over the partition-0 rows of every segment whose keys
        the store holds (flat segments, and product segments with store_codebooks), by
        q.k_i + b_i; with the selected rows' tags `tags`, only rows passing `where`, with
        `side` the side query's top-m beside it (`SearchResult.side`), and with want_keys
        the selected rows' keys (else `keys` is None: ids and scores are what most callers
        need, and keys are d_k times their bytes on the wire)."""

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """ids [M] int64 -> values [M, d_v] in the table's value dtype, on `device` (default
        the ids': host ids with device="cuda" let the rows reach the GPU without the ids
        waiting on it, and a GPU-resident store's rows never pass through the host). With hits [M] int64
        (entries with weight > 0) and weight_sum [M] float64, the fetch is a fetch-mode
        training readout's and its use of the rows is recorded as a pushdown readout's."""

    def readout(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Pushdown forward. ids [T, k] int64, weights [T, k] float32 ->
        [T, d_v] float32 = sum_j weights[t, j] * V[ids[t, j]]. Records usage."""

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor,
                         grad_out: torch.Tensor, *, request_id: str = "") -> torch.Tensor:
        """Pushdown backward. grad_out [T, d_v] -> grad of weights [T, k]
        float32. Row gradients are accumulated on the shards, applied at
        `end_step`. A request_id seen before is not accumulated again."""

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor,
                             *, request_id: str = "") -> None:
        """Gradients for flat keys: ids [M], grads [M, d_k]."""

    # Fetch mode: the caller computes the readout from `fetch`ed rows (and its backward
    # from them), then sends the rows' gradients, maybe in the background; `end_step`,
    # `usage` and `snapshot` wait for them.
    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor,
                               *, request_id: str = "") -> None:
        """Row gradients dL/dv: ids [M] int64 (repeats summed), grads [M, d_v] fp32; applied
        at `end_step` like readout_backward's."""

    def flush(self) -> None:
        """Wait until every mutation sent in the background has been applied; raise the
        first error among them."""

    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1,
                 request_id: str = "") -> int:
        """Step barrier: once all `num_workers` have called it for `step`, the
        sparse optimizer applies the accumulated row gradients (frozen rows
        untouched) and the balancing bias moves. Blocks until applied;
        returns the table's new step."""

    # -- control plane ----------------------------------------------------
    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tags: Mapping[str, torch.Tensor] | None = None, partition: torch.Tensor | int = 0
                 ) -> torch.Tensor:
        """Append rows (values [M, d_v], keys [M, d_k], optional selection bias [M],
        default 0, tags name -> [M] int64 >= -1, default unset, partition [M] int64 >= 0
        or one int for all) to the table's last flat segment (creating one if the last
        segment is a product segment). Returns their new ids [M]."""

    def set_optimizer(self, optimizer: OptimizerConfig, *, bias_step: float | None = None) -> RowOptimizer:
        """Replace the row optimizer (and, when given, the balancing step) of the whole
        table from the next end_step on (kinds: store_service/optimizer.py; "auto" resolves
        for the table's size); state the new kind needs and the table lacks is allocated
        (zeros), state of other kinds is kept. Returns the settings it replaced."""

    def set_frozen(self, ids: torch.Tensor, frozen: bool = True) -> None: ...

    def set_ablated(self, ids: torch.Tensor, ablated: bool = True) -> None: ...

    def usage(self) -> UsageStats: ...

    def snapshot(self, *, full: bool = False) -> int:
        """Publish the current state as a new version; returns its number. Each shard writes
        the rows changed since its base version (a delta) where it can, or all (`full`)."""

    def load_version(self, version: int) -> None:
        """Hot-swap every shard to a published version."""


def as_id_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.int64)


@dataclass(frozen=True)
class ShardDescription:
    """What a shard says about itself and about the table layout it serves."""
    info: ShardInfo
    d_k: int
    d_v: int
    value_dtype: str
    segments: tuple[SegmentInfo, ...]  # the whole table's segments, as this shard's version knows them


@runtime_checkable
class ShardHandle(Protocol):
    """One shard, in-process (`store_service.shard.Shard`) or remote
    (`store_service.client.RemoteShard`). `Table` scatters over these.

    Ids are global. For readout calls the caller has already replaced ids the
    shard does not own with PAD_ID. `version` is the version the caller
    expects (0 = whatever is serving); a shard that does not hold it raises
    `store_service.errors.StaleVersion`.
    """

    def describe(self) -> ShardDescription: ...
    def search(self, queries: torch.Tensor, k: int, *, tags: Sequence[str] = (), where: TagFilter | None = None,
               side: SideQuery | None = None, want_keys: bool = False, version: int = 0) -> SearchResult: ...
    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None, version: int = 0) -> torch.Tensor: ...
    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, version: int = 0) -> torch.Tensor: ...
    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "", version: int = 0) -> torch.Tensor: ...
    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                             request_id: str = "", version: int = 0) -> None: ...
    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                               request_id: str = "", version: int = 0) -> None: ...
    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1,
                 request_id: str = "", timeout_s: float = 60.0) -> int: ...
    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tags: Mapping[str, torch.Tensor] | None = None, partition: torch.Tensor | int = 0
                 ) -> torch.Tensor: ...
    def set_optimizer(self, optimizer: OptimizerConfig, *, bias_step: float | None = None) -> RowOptimizer: ...
    def set_frozen(self, ids: torch.Tensor, frozen: bool) -> None: ...
    def set_ablated(self, ids: torch.Tensor, ablated: bool) -> None: ...
    def usage(self) -> UsageStats: ...
    def write_snapshot(self, version_dir: str, version: int, *, full: bool = False) -> None: ...
    def prepare_version(self, store_root: str, version: int) -> None: ...
    def flip_version(self, version: int) -> None: ...
    def release_version(self, version: int) -> None: ...
    def relabel_version(self, version: int, new_version: int) -> int: ...
    def health(self) -> bool: ...
