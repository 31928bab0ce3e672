"""Which implementation runs each kernel: Triton on CUDA tensors (when Triton imports), the
PyTorch reference otherwise. The package (`store_service.kernels`) re-exports these."""
from __future__ import annotations

import os

import torch

from .reference import (
    product_key_search_reference,
    readout_weighted_backward_reference,
    readout_weighted_reference,
    softmax_readout_backward_reference,
    softmax_readout_reference,
)

# KSTORE_PK_TRITON=0 keeps product-key search on the torch reference on CUDA too
_PK_TRITON = os.environ.get("KSTORE_PK_TRITON", "1") != "0"


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        from .triton_readout import readout_weighted_triton  # noqa: F401  (imports only where Triton does)
    except ImportError:
        return False
    return True


def readout_weighted(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, d_v] fp32 = sum_j weights[t, j] * values[ids[t, j]] (ids -1 = padding)."""
    if _use_triton(values):
        from .triton_readout import readout_weighted_triton
        return readout_weighted_triton(values, ids, weights)
    return readout_weighted_reference(values, ids, weights)


def readout_weighted_backward(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                              grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_weights [T, k] fp32, unique ids [U] int64, row grads [U, d_v] fp32)."""
    if _use_triton(values):
        from .triton_readout import readout_weighted_backward_triton
        return readout_weighted_backward_triton(values, ids, weights, grad_out)
    return readout_weighted_backward_reference(values, ids, weights, grad_out)


def softmax_readout_forward(values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Fused gather + softmax + weighted sum: [T, d_v] fp32."""
    if _use_triton(values):
        from .triton_readout import softmax_readout_triton
        return softmax_readout_triton(values, ids, scores)
    return softmax_readout_reference(values, ids, scores)


def softmax_readout_backward(values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                             grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_scores [T, k] fp32, unique ids [U], row grads [U, d_v] fp32)."""
    if _use_triton(values):
        from .triton_readout import softmax_readout_backward_triton
        return softmax_readout_backward_triton(values, ids, scores, grad_out)
    return softmax_readout_backward_reference(values, ids, scores, grad_out)


def product_key_search(q_a: torch.Tensor, q_b: torch.Tensor, codebook_a: torch.Tensor,
                       codebook_b: torch.Tensor, k: int, bias_a: torch.Tensor | None = None,
                       bias_b: torch.Tensor | None = None, ablated: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k -> (scores [B, k] fp32 descending, ids [B, k] int64)."""
    # On CUDA: cuBLAS scores + a Triton selection kernel, exact (its speed against the
    # reference: benchmarks/KERNEL_NOTES.md). Ablation masks widen the candidate grid:
    # the reference handles those.
    if _PK_TRITON and _use_triton(q_a) and ablated is None:
        from .triton_pk_search import product_key_search_triton  # falls back to the reference for odd sizes
        return product_key_search_triton(q_a, q_b, codebook_a, codebook_b, k, bias_a, bias_b)
    return product_key_search_reference(q_a, q_b, codebook_a, codebook_b, k, bias_a, bias_b, ablated)
