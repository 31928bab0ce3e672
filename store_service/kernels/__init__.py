"""The readout and product-key search kernels, one entry point each.

Dispatch (`dispatch.py`): Triton on CUDA tensors, the PyTorch reference on CPU.
The store (pushdown, on the shard) and the model (fetch, on the worker) call these
functions and nothing below them; `autograd.py` wraps the fused softmax readout
for in-process model use.
"""
from __future__ import annotations

from .autograd import SoftmaxReadout, softmax_readout
from .dispatch import (
    product_key_search,
    readout_weighted,
    readout_weighted_backward,
    softmax_readout_backward,
    softmax_readout_forward,
)
from .reference import PAD_ID, compact_row_grads, masked_softmax

__all__ = [
    "PAD_ID", "SoftmaxReadout", "softmax_readout", "compact_row_grads", "masked_softmax", "product_key_search",
    "readout_weighted", "readout_weighted_backward",
    "softmax_readout_forward", "softmax_readout_backward",
]
