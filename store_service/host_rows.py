"""Rows kept in host memory answering a worker on another device (a GPU).

A host shard's rows sit in page-locked memory (`TableConfig.pin_memory`); a fetch from a
CUDA worker gathers the asked rows on the host straight into a page-locked buffer and
sends it with one asynchronous copy, so the worker's stream orders the copy before its
own use of the rows and the host thread returns at once. The page-locked buffer comes
from torch's caching host allocator, which keeps it from reuse until the copy that reads
it has finished. (A UVA gather kernel reading pinned memory from the GPU would skip the
host gather; benchmarks/STORE_NOTES.md, "Scale".)
"""
from __future__ import annotations

import torch


def gather_rows(values: torch.Tensor, rows: torch.Tensor, out_device: torch.device | str,
                pad: torch.Tensor | None = None) -> torch.Tensor:
    """values [R, d] (any device), rows [M] int64 in [0, R) -> values[rows] on out_device,
    rows where `pad` [M] bool is True set to 0."""
    out_device = torch.device(out_device)
    if values.device.type == "cpu" and out_device.type == "cuda":
        rows = rows.cpu()
        buf = torch.empty(rows.shape[0], values.shape[1], dtype=values.dtype, pin_memory=True)
        torch.index_select(values, 0, rows, out=buf)
        if pad is not None:
            buf[pad.cpu()] = 0
        return buf.to(out_device, non_blocking=True)
    out = values.index_select(0, rows.to(values.device))
    if pad is not None:
        out[pad.to(values.device)] = 0
    return out.to(out_device)
