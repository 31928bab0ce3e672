"""Appending rows to the table's last flat segment, on the shard that holds the table's
last rows. The caller has validated the rows and holds the state's lock."""
from __future__ import annotations

import torch

from .interface import SEGMENT_FLAT, TAG_UNSET, SegmentInfo
from .state import ShardState


def append_rows(st: ShardState, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None,
                tags: dict[str, torch.Tensor], partition: torch.Tensor | int) -> torch.Tensor:
    """values [M, d_v], keys [M, d_k], bias [M] or None (0), tags name -> [M] (absent: unset),
    partition [M] or one int, all on the state's device -> the new rows' global ids [M]
    (int64, CPU)."""
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
    num_flat = st.flat_ids.numel()
    st.flat_ids = torch.cat([st.flat_ids, torch.arange(start, start + m, device=st.device)])
    st.keys = torch.cat([st.keys, keys.float()])
    st.flat_bias = torch.cat([st.flat_bias, st.flat_bias.new_zeros(m) if bias is None else bias.float()])
    for name in sorted(set(st.tags) | set(tags)):
        held = st.tags.get(name, st.flat_ids.new_full((num_flat,), TAG_UNSET))
        st.tags[name] = torch.cat([held, tags[name] if name in tags else held.new_full((m,), TAG_UNSET)])
    new_partition = partition if isinstance(partition, torch.Tensor) else st.partition.new_full((m,), partition)
    st.partition = torch.cat([st.partition, new_partition])
    st.key_opt.append(m)
    st.dirty = torch.cat([st.dirty, st.dirty.new_ones(m)])   # new rows are changed rows
    st.row_end += m
    st.reindex()
    return torch.arange(start, start + m, dtype=torch.int64)
