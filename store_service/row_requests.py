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


def readout_rows(st: ShardState, ids: torch.Tensor, weights: torch.Tensor,
                  limits: Limits) -> tuple[torch.Tensor, torch.Tensor]:
    """A readout's ids and weights, validated -> (local rows, weights) on the state's device."""
    check.readout_entries(ids, weights)
    check.magnitude("weights", weights, limits.max_weight_abs, "max_weight_abs")
    check.ids_in_range("ids", ids, st.row_start, st.row_end, allow_pad=True)
    return st.local(ids), weights.to(st.device)
