"""Row-usage health metrics of a table (Lample et al. 2019, section 4.4):
the fraction of rows used, the KL divergence of the usage distribution from
uniform, and how much of the readout weight the hottest rows take."""
from __future__ import annotations

import math

import torch

from .interface import UsageStats


def usage_summary(usage: UsageStats, top_fraction: float = 0.01) -> dict:
    """-> {rows, rows_used, fraction_used, kl_from_uniform, top_share, frozen, ablated}.

    Only selectable (not ablated) rows count. kl_from_uniform is 0 for perfectly
    even use and log(N) when one row takes everything; top_share is the share of
    summed readout weight held by the top `top_fraction` of rows."""
    live = ~usage.ablated
    n = int(live.sum())
    w = usage.weight_sum[live].double()
    total = float(w.sum())
    out = {"rows": int(usage.hits.numel()), "selectable_rows": n, "frozen": int(usage.frozen.sum()),
           "ablated": int(usage.ablated.sum()), "rows_used": int((usage.hits[live] > 0).sum()),
           "reads": int(usage.hits.sum())}
    out["fraction_used"] = out["rows_used"] / n if n else 0.0
    if total > 0 and n:
        p = w / total
        nz = p[p > 0]
        out["kl_from_uniform"] = float((nz * (nz * n).log()).sum())
        top = max(1, int(math.ceil(top_fraction * n)))
        out["top_share"] = float(p.topk(top).values.sum())
    else:
        out["kl_from_uniform"] = 0.0
        out["top_share"] = 0.0
    out["top_fraction"] = top_fraction
    return out


def usage_histogram(usage: UsageStats, bins: int = 20) -> tuple[list[float], list[int]]:
    """Histogram of log10(1 + hits) over selectable rows: (bin edges, counts)."""
    h = torch.log10(1 + usage.hits[~usage.ablated].double())
    if h.numel() == 0:
        return [], []
    hi = float(h.max()) or 1.0
    counts = torch.histc(h, bins=bins, min=0.0, max=hi)
    edges = torch.linspace(0.0, hi, bins + 1)
    return edges.tolist(), [int(c) for c in counts]
