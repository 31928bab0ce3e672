"""Fused exact product-key search in Triton.

One program handles BLOCK_B queries:
  1. scores against codebook A: [BLOCK_B, n] by tl.dot (fp32 IEEE for fp32
     inputs, so the scores are the reference's up to summation order), + bias;
  2. top-KP of each row (bitonic top-k on packed int64 keys: the float score
     mapped to an order-preserving int32 in the high word, the column in the
     low word, so one sort carries the index with it);
  3. the same for codebook B;
  4. the KP x KP candidate sums, packed with their row ids (i * n + j), and a
     last top-KP; the first k are written.
Nothing but the final [B, k] scores and ids touches device memory.

Exactness: the top-k of the n^2 sums lies in the top-k x top-k grid, so the
result is exact (same ids as the reference up to ties; ties go to the smaller
id here). Ablation masks are not handled here (the dispatcher uses the
reference for them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_HAS_TOPK = hasattr(tl, "topk")


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@triton.jit
def _float_key(x):
    """fp32 -> int32 with the same order (signed compare)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_float(k):
    b = k ^ ((k >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _top(x, KP: tl.constexpr, NCOL: tl.constexpr, R: tl.constexpr, HAS_TOPK: tl.constexpr):
    """Largest KP along the last axis of x [R, NCOL], sorted descending."""
    if HAS_TOPK:
        y = tl.topk(x, KP)
    else:
        s = tl.sort(x, descending=True)
        s3 = tl.reshape(s, [R, NCOL // KP, KP])
        first = tl.arange(0, NCOL // KP)[None, :, None] == 0
        y = tl.sum(tl.where(first, s3, 0), axis=1)
    return y


@triton.jit
def _half_topk(q_ptr, c_ptr, bias_ptr, rows, rmask, B, N, D, stride_q, stride_c,
               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, KP: tl.constexpr,
               HAS_TOPK: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        dmask = offs_d < D
        q = tl.load(q_ptr + rows[:, None] * stride_q + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        c = tl.load(c_ptr + offs_n[None, :] * stride_c + offs_d[:, None],
                    mask=nmask[None, :] & dmask[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(q, c, acc, input_precision="ieee")
        else:
            acc = tl.dot(q, c, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(nmask[None, :], acc, float("-inf"))
    # high word: order-preserving score key; low word: (BLOCK_N - 1 - col) so ties pick the smaller col
    packed = (_float_key(acc).to(tl.int64) << 32) | (BLOCK_N - 1 - offs_n).to(tl.int64)[None, :]
    top = _top(packed, KP, BLOCK_N, BLOCK_B, HAS_TOPK)  # [BLOCK_B, KP]
    score = _key_float((top >> 32).to(tl.int32))
    col = (BLOCK_N - 1) - (top & 0x7FFFFFFF)
    return score, col


@triton.jit
def _pk_search_kernel(qa_ptr, qb_ptr, ca_ptr, cb_ptr, ba_ptr, bb_ptr, out_s_ptr, out_i_ptr,
                      B, N, D, stride_qa, stride_qb, stride_ca, stride_cb, K,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, KP: tl.constexpr,
                      HAS_TOPK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    sa, ia = _half_topk(qa_ptr, ca_ptr, ba_ptr, rows, rmask, B, N, D, stride_qa, stride_ca,
                        HAS_BIAS, IEEE, BLOCK_B, BLOCK_N, BLOCK_DK, KP, HAS_TOPK)
    sb, ib = _half_topk(qb_ptr, cb_ptr, bb_ptr, rows, rmask, B, N, D, stride_qb, stride_cb,
                        HAS_BIAS, IEEE, BLOCK_B, BLOCK_N, BLOCK_DK, KP, HAS_TOPK)
    cand = sa[:, :, None] + sb[:, None, :]                        # [BLOCK_B, KP, KP]
    cid = ia[:, :, None] * N + ib[:, None, :]                     # int64 row ids < 2^31
    packed = (_float_key(cand).to(tl.int64) << 32) | (0x7FFFFFFF - cid)
    packed = tl.reshape(packed, [BLOCK_B, KP * KP])
    top = _top(packed, KP, KP * KP, BLOCK_B, HAS_TOPK)          # [BLOCK_B, KP]
    score = _key_float((top >> 32).to(tl.int32))
    rid = 0x7FFFFFFF - (top & 0x7FFFFFFF)
    offs_k = tl.arange(0, KP)
    omask = rmask[:, None] & (offs_k[None, :] < K)
    optr = rows[:, None] * K + offs_k[None, :]
    tl.store(out_s_ptr + optr, score, mask=omask)
    tl.store(out_i_ptr + optr, rid, mask=omask)


def _pk_config(n: int, k: int, d: int):
    block_n = max(16, _next_pow2(n))
    kp = max(2, _next_pow2(k))
    block_b = 16
    block_dk = min(max(16, _next_pow2(d)), 64)
    num_warps = 8 if block_n >= 512 else 4
    return block_b, block_n, block_dk, kp, num_warps


def pk_search_supported(n: int, k: int) -> bool:
    kp = max(2, _next_pow2(k))
    return 1 <= n <= 4096 and k >= 1 and kp <= max(16, _next_pow2(n)) and n * n >= k and kp <= 64


def product_key_search_triton(q_a: torch.Tensor, q_b: torch.Tensor, codebook_a: torch.Tensor,
                              codebook_b: torch.Tensor, k: int, bias_a: torch.Tensor | None = None,
                              bias_b: torch.Tensor | None = None, config=None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k -> (scores [B, k] fp32 descending, ids [B, k] int64 = i*n + j)."""
    n, d = codebook_a.shape
    B = q_a.shape[0]
    if not pk_search_supported(n, k) or codebook_b.shape[0] != n:
        from .reference import product_key_search_reference
        return product_key_search_reference(q_a, q_b, codebook_a, codebook_b, k, bias_a, bias_b)
    dev = q_a.device
    out_s = torch.empty((B, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((B, k), dtype=torch.int64, device=dev)
    if B == 0:
        return out_s, out_i
    # both halves in one dtype; fp32 inputs use IEEE fp32 dots (exact vs the fp32 reference)
    dt = torch.promote_types(torch.promote_types(q_a.dtype, q_b.dtype),
                             torch.promote_types(codebook_a.dtype, codebook_b.dtype))
    if dt not in (torch.float32, torch.bfloat16, torch.float16) or not q_a.is_cuda:
        # off the GPU (the Triton interpreter in CI) use fp32: exact products either way
        dt = torch.float32
    qa, qb = q_a.to(dt), q_b.to(dt)
    ca, cb = codebook_a.to(dt).contiguous(), codebook_b.to(dt).contiguous()
    if qa.stride(-1) != 1:
        qa = qa.contiguous()
    if qb.stride(-1) != 1:
        qb = qb.contiguous()
    has_bias = bias_a is not None or bias_b is not None
    ba = (bias_a if bias_a is not None else torch.zeros(n, device=dev)).float().contiguous()
    bb = (bias_b if bias_b is not None else torch.zeros(n, device=dev)).float().contiguous()
    block_b, block_n, block_dk, kp, num_warps = config or _pk_config(n, k, d)
    grid = (triton.cdiv(B, block_b),)
    _pk_search_kernel[grid](qa, qb, ca, cb, ba, bb, out_s, out_i, B, n, d,
                            qa.stride(0), qb.stride(0), ca.stride(0), cb.stride(0), k,
                            HAS_BIAS=has_bias, IEEE=(dt == torch.float32), BLOCK_B=block_b,
                            BLOCK_N=block_n, BLOCK_DK=block_dk, KP=kp, HAS_TOPK=_HAS_TOPK,
                            num_warps=num_warps)
    return out_s, out_i
