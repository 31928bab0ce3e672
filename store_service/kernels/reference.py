"""PyTorch reference implementations of the knowledge-layer kernels.

These define the numbers every fast path is tested against. Shapes:
values [N, d_v] (fp32 or bf16), ids [T, k] int64 with -1 as padding,
weights / scores [T, k]. Accumulation is fp32.
"""
from __future__ import annotations

import torch

PAD_ID = -1


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 (and ints), fp64 kept (for gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _gather(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = ids >= 0
    rows = _acc(values[ids.clamp_min(0)])  # [T, k, d_v]
    return rows * valid.unsqueeze(-1), valid


def readout_weighted_reference(values: torch.Tensor, ids: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * values[ids[t, j]]  -> [T, d_v] fp32."""
    rows, _ = _gather(values, ids)
    return torch.einsum("tk,tkd->td", _acc(weights).to(rows.dtype), rows)


def compact_row_grads(ids: torch.Tensor, contrib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-(t, j) row contributions [T, k, d] into (unique ids [U], grads [U, d]).
    Padding ids are dropped."""
    flat_ids = ids.reshape(-1)
    flat = contrib.reshape(flat_ids.numel(), -1)
    keep = flat_ids >= 0
    flat_ids, flat = flat_ids[keep], flat[keep]
    uniq, inverse = torch.unique(flat_ids, return_inverse=True)
    flat = _acc(flat)
    grads = torch.zeros(uniq.numel(), flat.shape[1], dtype=flat.dtype, device=flat.device)
    grads.index_add_(0, inverse, flat)
    return uniq, grads


def readout_weighted_backward_reference(values: torch.Tensor, ids: torch.Tensor,
                                        weights: torch.Tensor, grad_out: torch.Tensor
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_weights [T, k] fp32, unique ids [U], row grads [U, d_v] fp32).
    dL/dw_j = g . v_{ids_j};  dL/dv_i = sum over (t, j) with ids[t, j] == i of w_tj g_t."""
    rows, _ = _gather(values, ids)
    g = _acc(grad_out).to(rows.dtype)
    grad_w = torch.einsum("td,tkd->tk", g, rows)
    contrib = _acc(weights).to(rows.dtype).unsqueeze(-1) * g.unsqueeze(1)  # [T, k, d_v]
    uniq, row_grads = compact_row_grads(ids, contrib)
    return grad_w, uniq, row_grads


def masked_softmax(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Softmax over k with padding slots excluded (a row of all padding gives zeros)."""
    s = _acc(scores).masked_fill(ids < 0, float("-inf"))
    w = torch.softmax(s, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def softmax_readout_reference(values: torch.Tensor, ids: torch.Tensor,
                              scores: torch.Tensor) -> torch.Tensor:
    """The fused op of issue 3: out[t] = sum_j softmax(scores[t])_j * values[ids[t, j]].
    Differentiable in `scores` and `values` through plain autograd."""
    return readout_weighted_reference(values, ids, masked_softmax(scores, ids))


def softmax_readout_backward_reference(values: torch.Tensor, ids: torch.Tensor,
                                       scores: torch.Tensor, grad_out: torch.Tensor
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_scores [T, k] fp32, unique ids [U], row grads [U, d_v] fp32)."""
    w = masked_softmax(scores, ids)
    grad_w, uniq, row_grads = readout_weighted_backward_reference(values, ids, w, grad_out)
    grad_s = w * (grad_w - (w * grad_w).sum(-1, keepdim=True))
    return grad_s, uniq, row_grads


def product_key_search_reference(q_a: torch.Tensor, q_b: torch.Tensor,
                                 codebook_a: torch.Tensor, codebook_b: torch.Tensor, k: int,
                                 bias_a: torch.Tensor | None = None,
                                 bias_b: torch.Tensor | None = None,
                                 ablated: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over na x nb product keys (Lample et al. 2019).

    q_a, q_b [B, d] (the two halves of a query); codebook_a [na, d], codebook_b
    [nb, d] (na < nb when a shard searches only its slice of the first codebook);
    optional per-sub-key selection biases [na], [nb]; optional ablated mask
    [na*nb] bool (ablated rows are never selected). Returns (scores [B, k] fp32,
    ids [B, k] int64 = i*nb + j), scores sorted descending, PAD_ID / -inf where
    fewer than k rows are selectable.

    Without ablation the top-k of sums lies in the top-k x top-k grid. With
    ablation, the grid is widened (doubling) until the k-th best unablated
    candidate beats every score outside the grid, which keeps it exact.
    """
    na, nb = codebook_a.shape[0], codebook_b.shape[0]
    sa = q_a.float() @ codebook_a.float().T  # [B, na]
    sb = q_b.float() @ codebook_b.float().T  # [B, nb]
    if bias_a is not None:
        sa = sa + bias_a.float()
    if bias_b is not None:
        sb = sb + bias_b.float()
    ca, cb = min(k, na), min(k, nb)
    while True:
        ta, ia = sa.topk(ca, dim=-1)  # [B, ca] sorted
        tb, ib = sb.topk(cb, dim=-1)
        cand = (ta.unsqueeze(-1) + tb.unsqueeze(-2)).reshape(q_a.shape[0], ca * cb)
        cand_ids = (ia.unsqueeze(-1) * nb + ib.unsqueeze(-2)).reshape(q_a.shape[0], ca * cb)
        if ablated is not None:
            cand = cand.masked_fill(ablated[cand_ids], float("-inf"))
        kk = min(k, ca * cb)
        top, pos = cand.topk(kk, dim=-1)
        if ablated is None or (ca == na and cb == nb):
            break
        # Anything outside the grid scores at most a_1 + b_cb (j outside) or a_ca + b_1 (i outside).
        outside = []
        if cb < nb:
            outside.append(ta[:, 0] + tb[:, -1])
        if ca < na:
            outside.append(ta[:, -1] + tb[:, 0])
        bound = torch.stack(outside).amax(0)
        if kk == k and bool((top[:, -1] >= bound).all()):
            break
        ca, cb = min(2 * ca, na), min(2 * cb, nb)
    ids = cand_ids.gather(-1, pos)
    if kk < k or ablated is not None or bias_a is not None:
        # Fewer than k selectable rows (ablated, or excluded by a -inf bias): pad.
        pad = torch.isinf(top) & (top < 0)
        ids = ids.masked_fill(pad, PAD_ID)
        if kk < k:
            top = torch.nn.functional.pad(top, (0, k - kk), value=float("-inf"))
            ids = torch.nn.functional.pad(ids, (0, k - kk), value=PAD_ID)
    return top, ids
