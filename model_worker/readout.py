"""The two ways a knowledge layer reads its selected rows out (DESIGN.md section 3).

- pushdown: the store computes r = sum_j w_j v_{I_j} on the shards (`table.readout`)
  and, in backward, dL/dw (`table.readout_backward`); row gradients stay on the store.
  Moves a [T, d_v] partial readout per shard each way (T = tokens x heads).
- fetch: the worker fetches the U distinct selected rows (`table.fetch`) and runs the
  store's own kernel on them; backward sends the rows' gradients dL/dv back
  (`accumulate_value_grads`, in the background: nothing waits for them until the step
  barrier). A training fetch carries the rows' usage, as a pushdown readout counts it.

Fetch wins when U < T: tables small against the batch, or heads that agree; "auto"
picks per call. Both train the same (up to fp32 summation order): the store applies
the same row gradients at `end_step`. A fetch is started before and collected after
whatever the caller computes meanwhile (the FFN beside the layer).

Only `store_service.kernels` functions and the `KnowledgeTable` protocol are used.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from store_service import kernels
from store_service.interface import KnowledgeTable


def request_id() -> str:
    return uuid.uuid4().hex


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous fp32 tensor; no op where it already is one (a no-op .float() is still
    an op the host pays for, and a small model's step is bound by them)."""
    return (t if t.dtype == torch.float32 else t.float()).contiguous()


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


class PushdownReadout(torch.autograd.Function):
    """r = table.readout(ids, w); backward: dL/dw = table.readout_backward(ids, w, dL/dr).
    The row gradients stay on the store and are applied at `table.end_step`."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, ids: torch.Tensor, table: KnowledgeTable) -> torch.Tensor:
        # weights [T, k] fp32, ids [T, k] int64 -> [T, d_v] fp32
        w = _fp32(weights.detach())
        ctx.table = table
        ctx.save_for_backward(ids, w)
        # A remote store's answer arrives in host memory (decoded from the wire, wherever its
        # shards live); the result joins the model on the worker's device.
        return _on(table.readout(ids, w), w.device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids, w = ctx.saved_tensors
        grad_w = ctx.table.readout_backward(ids, w, _fp32(grad_out), request_id=request_id())
        return _on(grad_w, w.device), None, None


class FetchReadout(torch.autograd.Function):
    """r computed here from the fetched distinct rows with the store's own kernel, and so
    is its backward; the rows' gradients go to the store (in the background)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor, local: torch.Tensor, uniq: torch.Tensor,
                table: KnowledgeTable) -> torch.Tensor:
        # weights [T, k] fp32; values [U, d_v] the fetched rows uniq [U]; local [T, k] from distinct_rows
        w = _fp32(weights.detach())
        ctx.table = table
        ctx.save_for_backward(uniq, local, w, values)
        return kernels.readout_weighted(values, local, w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        uniq, local, w, values = ctx.saved_tensors
        grad_w, rows, row_grads = kernels.readout_weighted_backward(values, local, w, _fp32(grad_out))
        if rows.numel():
            ctx.table.accumulate_value_grads(uniq[rows], row_grads, request_id=request_id())
        return grad_w, None, None, None, None


def distinct_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (the distinct selected rows [U] sorted, ids as positions in them [T, k], PAD kept)."""
    valid = ids >= 0
    uniq, inverse = torch.unique(ids[valid], return_inverse=True)  # [U], [#valid]
    local = torch.full_like(ids, kernels.PAD_ID)
    local[valid] = inverse
    return uniq, local


def fetch_usage(local: torch.Tensor, w: torch.Tensor, n_rows: int) -> dict[str, torch.Tensor]:
    """A training readout's use of its distinct rows, counted as a pushdown readout counts
    its own: hits [U] (entries with weight > 0) and weight_sum [U] (float64)."""
    valid = local >= 0
    lv, wv = local[valid], w[valid]
    read = lv[wv > 0]
    return {"hits": torch.zeros(n_rows, dtype=torch.int64, device=w.device).index_add_(0, read, torch.ones_like(read)),
            "weight_sum": torch.zeros(n_rows, dtype=torch.float64, device=w.device).index_add_(0, lv, wv.double())}


@dataclass
class PendingReadout:
    """A readout between `start_readout` and `finish_readout`: the selection, and in fetch
    mode the fetch of its distinct rows, in flight."""
    ids: torch.Tensor
    w: torch.Tensor
    fetch: Future | None = None
    uniq: torch.Tensor | None = None
    local: torch.Tensor | None = None


def start_readout(table: KnowledgeTable, ids: torch.Tensor, w: torch.Tensor, mode: str, training: bool,
                  fetcher: Callable[[], Executor]) -> PendingReadout:
    """Decide the path for this call; in fetch mode submit the fetch of the distinct rows to
    the executor `fetcher()` gives, so that the caller can compute something else while it
    is in flight."""
    p = PendingReadout(ids, w)
    if mode == "pushdown":
        return p
    uniq, local = distinct_rows(ids)
    if uniq.numel() == 0 or (mode == "auto" and uniq.numel() > ids.shape[0]):
        return p   # more distinct rows than readouts: pushdown moves fewer bytes
    # A training forward counts its rows' use (as a pushdown readout does, and the
    # balancing needs it); evaluation and generation read by fetch to leave usage alone.
    usage = fetch_usage(local, w.detach(), uniq.numel()) if training else {}
    # The fetch gets host copies (taken now, while the device has little queued): its
    # thread then never waits on the device, whose queue the caller is about to fill.
    host = {k: t.cpu() for k, t in usage.items()}
    p.uniq, p.local = uniq, local
    p.fetch = fetcher().submit(table.fetch, uniq.cpu(), device=p.w.device, **host)
    return p


def finish_readout(table: KnowledgeTable, p: PendingReadout) -> torch.Tensor:
    """r [T, d_v] fp32 (waits for the fetch, if one is in flight)."""
    if p.fetch is None:
        return PushdownReadout.apply(p.w, p.ids, table)
    values = p.fetch.result().to(p.w.device)                           # [U, d_v]
    return FetchReadout.apply(p.w, values, p.local, p.uniq, table)
