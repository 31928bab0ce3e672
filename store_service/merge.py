"""Top-k of several candidate lists: how a shard merges its segments' candidates and
how `Table` merges its shards' answers, the same way both times."""
from __future__ import annotations

from typing import Sequence

import torch

from .interface import PAD_ID, TAG_UNSET, SearchResult


def select_topk(scores: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor | None, k: int,
                tags: dict[str, torch.Tensor]) -> SearchResult:
    """Top-k of candidates scores [B, C] (C >= k), ids [B, C], keys [B, C, d_k] (or None)
    and tags name -> [B, C]; PAD where the score is -inf (tags -1 and keys 0 there)."""
    s, pos = scores.topk(k, dim=1)
    pad = torch.isneginf(s)
    out_ids = ids.gather(1, pos).masked_fill(pad, PAD_ID)
    out_keys = None
    if keys is not None:
        out_keys = keys.gather(1, pos.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        out_keys = out_keys * (out_ids >= 0).unsqueeze(-1)
    out_tags = {name: t.gather(1, pos).masked_fill(pad, TAG_UNSET) for name, t in tags.items()}
    return SearchResult(out_ids, s, out_keys, out_tags)


def merge_results(parts: Sequence[SearchResult], k: int, tags: Sequence[str],
                  device: torch.device | str) -> SearchResult:
    """The k best of several results [B, k_i] (keys None on all or none of them), on
    `device`; a tag a part did not return is unset on its rows."""
    def cat(get) -> torch.Tensor:
        return torch.cat([get(p).to(device) for p in parts], 1)
    keys = None if parts[0].keys is None else cat(lambda p: p.keys)
    return select_topk(cat(lambda p: p.scores), cat(lambda p: p.ids), keys, k,
                       {name: cat(lambda p, n=name: p.tags.get(n, torch.full_like(p.ids, TAG_UNSET)))
                        for name in tags})


def empty_result(batch: int, k: int, tags: Sequence[str], device, d_k: int | None) -> SearchResult:
    """k padding entries per query (keys [B, k, d_k] of zeros, or None when d_k is None)."""
    none = torch.full((batch, k), PAD_ID, dtype=torch.int64, device=device)
    keys = None if d_k is None else torch.zeros(batch, k, d_k, device=device)
    return SearchResult(none, torch.full((batch, k), float("-inf"), device=device), keys,
                        {name: none.clone() for name in tags})
