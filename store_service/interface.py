"""The one interface through which the model reaches a knowledge table.

Two things implement `KnowledgeTable`: the in-process `store_service.table.Table`
over `Shard` objects, and the same `Table` over `RemoteShard` gRPC handles
(`store_service.client`). The model cannot tell them apart.

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
- Cues and gates (flat rows only; int64 group labels, -1 = none): a row with a
  gate g may be selected at a position of a sequence only once label g is open
  there (the knowledge layer applies this; the store keeps the labels with the
  rows and returns them with a search). A label opens at the first position where
  a row with it as cue is selected, and stays open for the rest of the sequence.
  `continual.learn` keys a new fact's answer rows on its subject this way.
- Detectors: a flat row with both a cue c and a gate g is never read out and never
  returned by the top-k of `search`; `search(..., detectors=m)` returns the m best
  detectors per query beside it, scored by the cosine of the query with the key
  plus the bias. Its score is evidence for label c against the other labels whose
  detectors share gate g: label c opens at a position where g is open and c's best
  evidence so far in the sequence (at that position or an earlier one) is the
  highest among them. `continual.learn` uses this to tell a subject's facts apart
  by their phrasing, wherever in the prompt it says which fact is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

PAD_ID = -1

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
    gated_rows: int = 0  # flat rows with a gate (selectable only after their cue fired), detectors included
    detector_rows: int = 0  # flat rows with a cue and a gate: evidence only, never read

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
    def gated_rows(self) -> int:
        return sum(s.gated_rows for s in self.shards)

    @property
    def detector_rows(self) -> int:
        return sum(s.detector_rows for s in self.shards)


@dataclass
class Detections:
    """The best detectors for each query (interface docstring: detectors)."""
    ids: torch.Tensor     # [B, m] int64, PAD_ID where fewer than m detectors exist
    scores: torch.Tensor  # [B, m] float32, cos(q, k_i) + b_i (-inf at PAD)
    cue: torch.Tensor     # [B, m] int64, the label each detector is evidence for (-1 at PAD)
    gate: torch.Tensor    # [B, m] int64, the gate the detector's label competes under (-1 at PAD)

    def to(self, device) -> "Detections":
        return Detections(self.ids.to(device), self.scores.to(device), self.cue.to(device), self.gate.to(device))


@dataclass
class SearchResult:
    ids: torch.Tensor     # [B, k] int64, PAD_ID where fewer than k rows exist
    scores: torch.Tensor  # [B, k] float32, selection score q.k_i + b_i (-inf at PAD)
    keys: torch.Tensor    # [B, k, d_k] float32, the keys of the selected rows (0 at PAD)
    cue: torch.Tensor | None = None   # [B, k] int64, the rows' cue group (-1: none, and at PAD)
    gate: torch.Tensor | None = None  # [B, k] int64, the rows' gate group (-1: ungated, and at PAD)
    detectors: Detections | None = None  # with search(..., detectors=m > 0)


@dataclass
class UsageStats:
    hits: torch.Tensor        # [N] int64: times a row was read out (weight > 0)
    weight_sum: torch.Tensor  # [N] float64: summed readout weight per row
    frozen: torch.Tensor      # [N] bool
    ablated: torch.Tensor     # [N] bool


@runtime_checkable
class KnowledgeTable(Protocol):
    """What the model may do with a table. Every call is batched."""

    def info(self) -> TableInfo: ...

    # -- data plane -------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int, *, detectors: int = 0) -> SearchResult:
        """queries [B, d_k] -> top-k over every segment whose keys the store
        holds (flat segments, and product segments whose codebooks it holds),
        detectors left out; with detectors=m > 0 also the m best detectors."""

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None) -> torch.Tensor:
        """ids [M] int64 -> values [M, d_v] in the table's value dtype. With hits [M] int64
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
                 cue: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Append rows (values [M, d_v], keys [M, d_k], optional selection bias
        [M], default 0, optional cue and gate groups [M] int64, default -1) to the
        table's last flat segment (creating one if the last segment is a product
        segment). Returns their new ids [M]."""

    def set_frozen(self, ids: torch.Tensor, frozen: bool = True) -> None: ...

    def set_ablated(self, ids: torch.Tensor, ablated: bool = True) -> None: ...

    def usage(self) -> UsageStats: ...

    def snapshot(self) -> int:
        """Publish the current state as a new version; returns its number."""

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
    def search(self, queries: torch.Tensor, k: int, *, detectors: int = 0, version: int = 0) -> SearchResult: ...
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
                 cue: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor: ...
    def set_frozen(self, ids: torch.Tensor, frozen: bool) -> None: ...
    def set_ablated(self, ids: torch.Tensor, ablated: bool) -> None: ...
    def usage(self) -> UsageStats: ...
    def write_snapshot(self, version_dir: str, version: int) -> None: ...
    def prepare_version(self, store_root: str, version: int) -> None: ...
    def flip_version(self, version: int) -> None: ...
    def release_version(self, version: int) -> None: ...
    def health(self) -> bool: ...
