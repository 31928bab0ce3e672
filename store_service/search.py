"""Search on one shard's state: the top-k over the rows it holds keys for, a side query
over one partition, and the tag filter both honour. The caller holds the state's lock.

Scores: the top-k ranks partition-0 rows by q . k_i + b_i (product rows by the two
sub-keys' scores and biases); a side query ranks the rows of one partition p >= 1 by
cos(q, k_i) + b_i. Ablated rows are never returned.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import kernels
from .flat_index import FaissFlatIndex, exact_topk
from .interface import PAD_ID, TAG_UNSET, SearchResult, SideQuery, TagFilter
from .merge import empty_result, select_topk
from .state import ShardState


def _tag_at(st: ShardState, name: str, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Tag `name` of the flat rows at positions `pos` where `valid`, else unset (also where
    the shard holds no such tag)."""
    t = st.tags.get(name)
    if t is None:
        return torch.full_like(pos, TAG_UNSET)
    return t[pos].masked_fill(~valid, TAG_UNSET)


def filter_mask(st: ShardState, where: TagFilter | None) -> torch.Tensor | None:
    """[F] bool: the flat rows `where` lets through (None: no filter)."""
    if where is None:
        return None
    t = st.tags.get(where.name)
    if t is None:
        return torch.zeros_like(st.flat_ids, dtype=torch.bool)
    keep = t != TAG_UNSET
    if where.values:
        keep &= torch.isin(t, torch.tensor(where.values, dtype=torch.int64, device=t.device))
    return keep


def top_k(st: ShardState, q: torch.Tensor, k: int, tags: Sequence[str] = (),
          where: TagFilter | None = None, want_keys: bool = False) -> SearchResult:
    """q [B, d_k] fp32 on the state's device -> the k best partition-0 rows this shard
    holds keys for, padded with PAD_ID / -inf, with the tags named in `tags`, and with
    want_keys their keys [B, k, d_k] (else keys None: d_k times the ids' bytes saved)."""
    cfg = st.config
    all_s, all_ids, all_keys = [], [], []
    all_tags: dict[str, list[torch.Tensor]] = {name: [] for name in tags}
    if st.flat_ids.numel():
        excluded = st.ablated[st.flat_local]
        if st.outside_top_k is not None:
            excluded = excluded | st.outside_top_k
        keep = filter_mask(st, where)
        if keep is not None:
            # The mask changes with every filter: exact search (the faiss index is built
            # for one mask and reused until the rows change).
            s, pos = exact_topk(q, st.keys, k, st.flat_bias, excluded | ~keep)
        elif cfg.faiss_threshold and st.flat_ids.numel() >= cfg.faiss_threshold:
            if st.faiss is None:
                st.faiss = FaissFlatIndex(cfg.faiss_factory, gpu=st.device.type == "cuda")
            s, pos = st.faiss.search(q, st.keys, k, st.flat_bias, excluded)
        else:
            s, pos = exact_topk(q, st.keys, k, st.flat_bias, excluded)
        valid = pos >= 0
        p = pos.clamp_min(0)
        all_s.append(s)
        all_ids.append(torch.where(valid, st.flat_ids[p], torch.full_like(p, PAD_ID)))
        if want_keys:
            all_keys.append(st.keys[p].float() * valid.unsqueeze(-1))
        for name in tags:
            all_tags[name].append(_tag_at(st, name, p, valid))
    h = cfg.d_k // 2
    for pc in st.pieces if where is None else ():   # product rows have no tags: a filter leaves them out
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
        if want_keys:
            all_keys.append(torch.cat([pc.codebook_a[ia], pc.codebook_b[ib]], -1).float() * valid.unsqueeze(-1))
        for name in tags:
            all_tags[name].append(torch.full_like(sub, TAG_UNSET))
    if not all_s:  # this shard holds no searchable rows
        return empty_result(q.shape[0], k, tags, q.device, cfg.d_k if want_keys else None)
    return select_topk(torch.cat(all_s, 1), torch.cat(all_ids, 1), torch.cat(all_keys, 1) if want_keys else None, k,
                       {name: torch.cat(parts, 1) for name, parts in all_tags.items()})


def side_k(st: ShardState, q: torch.Tensor, side: SideQuery, tags: Sequence[str] = (),
           where: TagFilter | None = None) -> SearchResult:
    """The side.k best rows of partition side.partition by cos(q, key) + bias, padded
    likewise; keys None."""
    pos = st.partition_pos.get(side.partition)
    keep = filter_mask(st, where)
    if pos is not None and keep is not None:
        pos = pos[keep[pos]]
    if pos is None or not pos.numel():
        return empty_result(q.shape[0], side.k, tags, q.device, None)
    s, sel = exact_topk(torch.nn.functional.normalize(q.float(), dim=-1), st.keys[pos], side.k, st.flat_bias[pos],
                        st.ablated[st.flat_local[pos]])
    valid = sel >= 0
    p = pos[sel.clamp_min(0)]
    return SearchResult(torch.where(valid, st.flat_ids[p], torch.full_like(p, PAD_ID)), s, None,
                        {name: _tag_at(st, name, p, valid) for name in tags})
