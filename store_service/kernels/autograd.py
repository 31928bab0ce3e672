"""autograd wrapper of the fused softmax readout, for in-process model use.

    out = SoftmaxReadout.apply(values, ids, scores)          # dense grad for values
    out = softmax_readout(values, ids, scores, sparse_grad=True)  # sparse COO grad

forward and backward go through the dispatching entry points (Triton on CUDA,
the reference on CPU). The backward gets the compact (unique ids, row grads)
pair and turns it into the gradient autograd wants for `values`: a dense
index_add of the row grads (default), or a sparse COO tensor.
"""
from __future__ import annotations

import torch

from .dispatch import softmax_readout_backward, softmax_readout_forward


class SoftmaxReadout(torch.autograd.Function):
    """forward(values [N, d_v], ids [T, k] int64 (-1 = padding), scores [T, k]) -> [T, d_v] fp32."""

    @staticmethod
    def forward(ctx, values, ids, scores, sparse_grad: bool = False):
        ctx.save_for_backward(values, ids, scores)
        ctx.sparse_grad = sparse_grad
        return softmax_readout_forward(values, ids, scores)

    @staticmethod
    def backward(ctx, grad_out):
        values, ids, scores = ctx.saved_tensors
        grad_s, uniq, row_grads = softmax_readout_backward(values, ids, scores,
                                                           grad_out.float().contiguous())
        grad_v = None
        if ctx.needs_input_grad[0]:
            if ctx.sparse_grad:
                grad_v = torch.sparse_coo_tensor(uniq.unsqueeze(0), row_grads.to(values.dtype),
                                                 values.shape, is_coalesced=True,
                                                 check_invariants=False)
            else:
                dense = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
                dense.index_add_(0, uniq, row_grads)
                grad_v = dense.to(values.dtype)
        grad_scores = grad_s.to(scores.dtype) if ctx.needs_input_grad[2] else None
        return grad_v, None, grad_scores, None


def softmax_readout(values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                    sparse_grad: bool = False) -> torch.Tensor:
    """Differentiable fused readout: sum_j softmax(scores[t])_j * values[ids[t, j]]."""
    return SoftmaxReadout.apply(values, ids, scores, sparse_grad)
