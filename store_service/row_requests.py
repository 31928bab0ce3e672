"""A shard's data requests checked against the state answering them: k, fetched rows
(their usage recorded), readout rows. Kept out of `shard` so it stays the versions and the API."""
from __future__ import annotations

import torch

from . import errors
from . import validation as check
from .limits import Limits
from .state import ShardState

MAX_SEARCH_K = 1 << 16   # the most rows a shard that is not the table's last returns per query


def check_k(st: ShardState, k, field: str = "k") -> None:
    check.integer(field, k, 1)
    if st.is_last:
        # the last shard: rows are appended here, so its view of the table is current
        if k > st.row_end:
            raise errors.InvalidArgument(field, f"{field}={k} exceeds the table's {st.row_end} rows")
        if field == "k" and st.searchable_rows() == 0:
            raise errors.InvalidArgument("k", "the table holds no searchable keys (no flat rows, no codebooks)")
    elif k > MAX_SEARCH_K:
        # another shard's view may predate rows appended since (the table checks k against
        # its own row count): it answers from its own rows, padded, up to a bound on the answer
        raise errors.InvalidArgument(field, f"{field}={k} exceeds {MAX_SEARCH_K}")


def fetched_rows(st: ShardState, ids: torch.Tensor, hits, weight_sum, limits: Limits) -> torch.Tensor:
    """A fetch's ids, validated, with its usage recorded -> local rows (-1 at PAD)."""
    check.tensor("ids", ids, torch.int64, (None,))
    check.ids_in_range("ids", ids, st.row_start, st.row_end, allow_pad=True)
    check.fetch_usage(ids, hits, weight_sum, limits)
    local = st.local(ids)
    if hits is not None:
        keep = local >= 0
        rows, h = local[keep], hits.to(st.device)[keep]
        st.hits.index_add_(0, rows, h)
        st.step_hits.index_add_(0, rows, h)
        st.weight_sum.index_add_(0, rows, weight_sum.to(st.device)[keep])
        st.mark_rows(rows)
    return local


def readout_rows(st: ShardState, ids: torch.Tensor, weights: torch.Tensor, limits: Limits,
                 defer: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A readout's ids and weights, validated -> (local rows, weights) on the state's device.
    defer: where the device-side verdicts go (`validation.at_once`); None: read one by one."""
    check.readout_entries(ids, weights, defer)
    check.magnitude("weights", weights, limits.max_weight_abs, "max_weight_abs", defer)
    check.ids_in_range("ids", ids, st.row_start, st.row_end, allow_pad=True, defer=defer)
    return st.local(ids), weights.to(st.device)


def record_readout_usage(st: ShardState, local: torch.Tensor, weights: torch.Tensor) -> None:
    """A pushdown readout's use of its rows (local [T, k], -1 at PAD; weights [T, k] on the
    state's device): hits and step_hits count the entries with weight > 0, weight_sum adds every
    entry's weight (float64), and the rows are marked changed. Every entry is added, PAD as
    nothing (0 hits, +0.0) into row 0, rather than the valid ones picked out by boolean masks:
    on CUDA each mask made the host wait for the device (its count sizes the output), three
    per readout. The sums are the same: x + 0 is x (a weight sum is never -0.0)."""
    valid = local >= 0
    rows = local.clamp_min(0).reshape(-1)
    hit = (valid & (weights > 0)).reshape(-1).to(st.hits.dtype)
    st.hits.index_add_(0, rows, hit)
    st.step_hits.index_add_(0, rows, hit)
    st.weight_sum.index_add_(0, rows, torch.where(valid, weights, 0.0).reshape(-1).double())
    st.mark_rows_where(rows, valid.reshape(-1))
