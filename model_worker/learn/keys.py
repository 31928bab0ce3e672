"""Keys (and selection biases) for new rows, from the queries they should answer.

One key per (layer, group, position, head): its direction is the mean of the group's
queries (minus what old-text queries share), its scale puts it `margin` above the best
product row on those queries, and old text (`background` queries) is kept off it by
capping the scale or by a negative selection bias (`select_bias`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import Transformer


@torch.no_grad()
def init_new_keys(model: Transformer, queries: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  margin: float, max_rows: int = 0, seed: int = 0,
                  background: dict[int, torch.Tensor] | None = None, contrast: bool = True,
                  bg_quantile: float = 0.0, select_bias: bool = False, select_margin: float = 0.05,
                  whiten: float = 0.0) -> tuple[torch.Tensor, dict]:
    """One key per (layer, group, position, head) -> keys [M, d_k], info.

    Direction: the mean of the group's normalised queries, minus (contrast) the mean
    of the background queries of that head, so that what every context shares does
    not count; `whiten` > 0 turns that difference by the inverse covariance of the
    background queries (ridge `whiten` x their mean variance), so that the key scores
    low along the directions old text varies in most. Scale: `margin` above the best product-key score of the group's
    queries; with `background` (old-text queries [P, h, d_k] per layer) capped so
    that the key's score on (1 - bg_quantile) of them stays below their k-th best
    product score: the row is then not selected in old contexts, and old answers
    cannot change. Rows that cannot reach their own queries under that cap are kept
    (harmless) and counted in info["unreachable"].

    select_bias (needs `background`): no cap on the scale, so that the key scores
    `margin` above the best product row and the row takes most of the softmax weight
    where it is selected; instead each row gets a (negative) selection bias, the
    largest that keeps the same old-text queries from selecting it: selection
    becomes a threshold on q.u, the softmax weight is unchanged by the bias. The
    biases are returned in info["bias"] [M].

    info["row_groups"] [M] and info["row_layers"] [M]: each key's group (the first
    column of the queries' group key) and knowledge layer."""
    keys, biases, info = [], [], {}
    row_groups, row_layers = [], []
    for layer, (q, gk) in queries.items():
        kl = model.layers[layer].knowledge
        P, h, d = q.shape
        uniq, inv = torch.unique(gk, dim=0, return_inverse=True)             # [U, 2], [P]
        U = uniq.shape[0]
        row_groups.append(uniq[:, 0].repeat_interleave(h))
        row_layers.append(torch.full((U * h,), layer, dtype=torch.int64))
        mean = torch.zeros(U, h, d).index_add_(0, inv, F.normalize(q, dim=-1))
        mean = mean / torch.bincount(inv, minlength=U).clamp_min(1)[:, None, None].float()
        bg = background.get(layer) if background else None
        if contrast and bg is not None:
            mean = mean - F.normalize(bg, dim=-1).mean(0)[None]                 # [U, h, d]
        if whiten > 0 and bg is not None:
            nb = F.normalize(bg, dim=-1)
            c = nb - nb.mean(0)
            cov = torch.einsum("phd,phe->hde", c, c) / max(c.shape[0] - 1, 1)    # [h, d, d]
            ridge = whiten * cov.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(d)
            mean = torch.linalg.solve(cov + ridge, mean.permute(1, 2, 0)).permute(2, 0, 1)   # [U, h, d]
        u = F.normalize(mean, dim=-1)
        own = torch.zeros(U, h).index_add_(0, inv, (q * u[inv]).sum(-1))
        own = own / torch.bincount(inv, minlength=U).clamp_min(1)[:, None].float()   # mean q.u in the group
        best = kl.product_scores(q.reshape(P * h, d), 1).reshape(P, h)
        best_g = torch.full((U, h), float("-inf")).scatter_reduce(0, inv[:, None].expand(P, h), best, "amax")
        scale = (best_g + margin) / own.clamp_min(1e-3)
        cap = torch.full_like(scale, float("inf"))
        own_kth = kl.product_scores(q.reshape(P * h, d), kl.k)[:, -1].reshape(P, h)
        if select_bias and bg is not None:
            qb = bg.reshape(-1, d)
            kth = kl.product_scores(qb, kl.k)[:, -1]
            flat_k = (u * scale[..., None]).reshape(U * h, d)
            bs = []
            for c in range(0, flat_k.shape[0], 512):
                slack = kth[:, None] - qb @ flat_k[c:c + 512].T                  # [Pb, c]: bias that ties
                bs.append(slack.quantile(bg_quantile, dim=0) if bg_quantile > 0 else slack.min(0).values)
            # below the tie with the closest old-text query by select_margin x the key's scale:
            # a safety margin for old text the background sample does not contain
            bias = (torch.cat(bs) - select_margin * scale.reshape(-1)).reshape(U, h)
            mine = (q * (u * scale[..., None])[inv]).sum(-1) + bias[inv]         # [P, h] own selection score
            hit = torch.zeros(U, h).index_add_(0, inv, (mine > own_kth).float())
            hit = hit / torch.bincount(inv, minlength=U).clamp_min(1)[:, None].float()
            keys.append((u * scale[..., None]).reshape(U * h, d))
            biases.append(bias.reshape(-1))
            info[f"layer{layer}"] = {"groups": U, "queries": P, "heads": h, "mean_scale": float(scale.mean()),
                                     "mean_bias": float(bias.mean()),
                                     "mean_best_product_score": float(best_g.mean()),
                                     "own_queries_selecting": float(hit.mean()),
                                     "unreachable": float((hit == 0).float().mean())}
            continue
        if bg is not None:
            qb = bg.reshape(-1, d)                                              # every head's old queries
            kth = kl.product_scores(qb, kl.k)[:, -1]                       # [Pb] score needed to be selected
            flat_u = u.reshape(U * h, d)
            caps = []
            for c in range(0, flat_u.shape[0], 512):
                sc = qb @ flat_u[c:c + 512].T                                   # [Pb, c]
                ratio = torch.where(sc > 0, kth[:, None].clamp_min(1e-3) / sc, torch.full_like(sc, float("inf")))
                caps.append(ratio.quantile(bg_quantile, dim=0) if bg_quantile > 0 else ratio.min(0).values)
            cap = 0.98 * torch.cat(caps).reshape(U, h)
        scale = torch.minimum(scale, cap)
        reach = own * scale                                                     # mean own score after the cap
        kth_g = torch.full((U, h), float("inf")).scatter_reduce(0, inv[:, None].expand(P, h), own_kth, "amin")
        keys.append((u * scale[..., None]).reshape(U * h, d))
        info[f"layer{layer}"] = {"groups": U, "queries": P, "heads": h, "mean_scale": float(scale.mean()),
                                 "mean_best_product_score": float(best_g.mean()),
                                 "capped_by_background": float((cap < (best_g + margin) / own.clamp_min(1e-3)).float().mean()),
                                 "unreachable": float((reach <= kth_g).float().mean()),
                                 "above_best_product": float((reach > best_g).float().mean())}
    keys = torch.cat(keys)
    bias = torch.cat(biases) if biases else None
    groups, layers = torch.cat(row_groups), torch.cat(row_layers)
    if max_rows and keys.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(keys.shape[0], generator=g)[:max_rows]
        keys, groups, layers = keys[pick], groups[pick], layers[pick]
        bias = bias[pick] if bias is not None else None
    info["row_groups"], info["row_layers"] = groups, layers
    if bias is not None:
        info["bias"] = bias.float().contiguous()
    return keys.float().contiguous(), info
