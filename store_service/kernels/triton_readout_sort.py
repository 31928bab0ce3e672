"""The first stage of both readout backward pipelines (triton_readout.py's
first-occurrence pipeline and triton_readout_chunked.py's chunked one): per token,
the sort keys of its k ids (padding -> a sentinel that sorts last) and, for the
fused softmax, the weights recomputed from the scores; then, on the sorted keys,
the flags of the positions where a real row's segment starts (their prefix sum
numbers the segments, i.e. the output slots, in row-id order).
"""
from __future__ import annotations

import triton
import triton.language as tl


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@triton.jit
def masked_softmax(s, idk):
    """Softmax of one token's k scores over its real ids (idk >= 0; padding weighs 0, and a
    token with no real id gets all zeros)."""
    s = tl.where(idk >= 0, s, float("-inf"))
    m = tl.max(s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(s - m)
    den = tl.sum(e, axis=0)
    return e * tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _bwd_prep_kernel(s_ptr, ids_ptr, w_ptr, key_ptr, K, SENT, K_PAD: tl.constexpr, SOFTMAX: tl.constexpr):
    """Per token: the sort keys of its k ids (padding -> SENT, which sorts last) and,
    for the fused softmax, the weights recomputed from the scores (one launch for both)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, K_PAD)
    mask = offs < K
    idk = tl.load(ids_ptr + t * K + offs, mask=mask, other=-1)
    tl.store(key_ptr + t * K + offs, tl.where(idk >= 0, idk, SENT).to(key_ptr.dtype.element_ty), mask=mask)
    if SOFTMAX:
        s = tl.load(s_ptr + t * K + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(w_ptr + t * K + offs, masked_softmax(s, idk), mask=mask)


@triton.jit
def _start_flags_kernel(skey_ptr, flag_ptr, TK, SENT, BLOCK: tl.constexpr):
    """flag[i] = 1 where sorted position i starts the segment of a real id."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < TK
    cur = tl.load(skey_ptr + offs, mask=m, other=SENT)
    prev = tl.load(skey_ptr + offs - 1, mask=m & (offs >= 1), other=SENT)
    start = (cur != SENT) & ((offs == 0) | (cur != prev))
    tl.store(flag_ptr + offs, start.to(tl.int32), mask=m)
