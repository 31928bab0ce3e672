"""Fused exact product-key search in Triton.

One program handles BLOCK_B queries:
  1. scores against codebook A by chunks of CHUNK_N sub-keys: tl.dot (fp32
     IEEE for fp32 inputs, so the scores are the reference's up to summation
     order), + bias;
  2. top-KP of each chunk, merged into a running top-KP (bitonic top-k on
     packed int64 keys: the float score mapped to an order-preserving int32 in
     the high word, the column in the low word, so one sort carries the index);
  3. the same for codebook B;
  4. only the candidate pairs (i, j) with (i+1)(j+1) <= k can reach the top k
     (130 of 1024 for k = 32): their sums, packed with their row ids
     (i * n + j), and a last top-KP; the first k are written.
Only the final [B, k] scores and ids (and a tiny per-query scratch) touch device memory.

Speed (H100, 16384 queries, n = 1024, k = 32, d = 64): 1.81 ms fp32 against 1.90 ms
for the torch reference; the int64 bitonic sorts, not the dots, bound it
(see benchmarks/KERNEL_NOTES.md; a radix-select variant was slower, 3.06 ms).

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
def _half_topk(q_ptr, c_ptr, bias_ptr, rows, rmask, N, D, stride_q, stride_c,
               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
               CHUNK_N: tl.constexpr, BLOCK_DK: tl.constexpr, KP: tl.constexpr,
               HAS_TOPK: tl.constexpr):
    """Top-KP sub-keys of one half for BLOCK_B queries: scores by chunks of
    CHUNK_N sub-keys, each chunk's top-KP merged into a running top-KP (small
    tiles keep the sort's layout conversions inside shared memory)."""
    ninf = tl.full([BLOCK_B, KP], float("-inf"), tl.float32)
    best = _float_key(ninf).to(tl.int64) << 32
    for n0 in range(0, N, CHUNK_N):
        offs_n = n0 + tl.arange(0, CHUNK_N)
        nmask = offs_n < N
        acc = tl.zeros([BLOCK_B, CHUNK_N], dtype=tl.float32)
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
        # high word: order-preserving score key; low word: 2^31-1 - col (ties -> smaller col)
        packed = (_float_key(acc).to(tl.int64) << 32) | (0x7FFFFFFF - offs_n).to(tl.int64)[None, :]
        ctop = _top(packed, KP, CHUNK_N, BLOCK_B, HAS_TOPK)            # [BLOCK_B, KP]
        both = tl.reshape(tl.join(best, ctop), [BLOCK_B, 2 * KP])      # order irrelevant
        best = _top(both, KP, 2 * KP, BLOCK_B, HAS_TOPK)
    score = _key_float((best >> 32).to(tl.int32))
    col = 0x7FFFFFFF - (best & 0x7FFFFFFF)
    col = tl.where(col < N, col, 0)  # only -inf filler can be out of range
    return score, col


@triton.jit
def _pk_search_kernel(qa_ptr, qb_ptr, ca_ptr, cb_ptr, ba_ptr, bb_ptr, pi_ptr, pj_ptr,
                      scr_s_ptr, scr_i_ptr, out_s_ptr, out_i_ptr,
                      B, N, D, stride_qa, stride_qb, stride_ca, stride_cb, K,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
                      CHUNK_N: tl.constexpr, BLOCK_DK: tl.constexpr, KP: tl.constexpr,
                      NP: tl.constexpr, HAS_TOPK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    sa, ia = _half_topk(qa_ptr, ca_ptr, ba_ptr, rows, rmask, N, D, stride_qa, stride_ca,
                        HAS_BIAS, IEEE, BLOCK_B, CHUNK_N, BLOCK_DK, KP, HAS_TOPK)
    sb, ib = _half_topk(qb_ptr, cb_ptr, bb_ptr, rows, rmask, N, D, stride_qb, stride_cb,
                        HAS_BIAS, IEEE, BLOCK_B, CHUNK_N, BLOCK_DK, KP, HAS_TOPK)
    # Candidates: with both halves sorted, (i, j) can be among the top k only if
    # (i + 1) * (j + 1) <= k (each of those pairs scores at least as high). The
    # NP pairs (pi, pj) are listed on the host; the per-half lists go through a
    # tiny per-program scratch so they can be gathered by pair.
    offs_kp = tl.arange(0, KP)
    sbase = rows[:, None] * (2 * KP) + offs_kp[None, :]
    tl.store(scr_s_ptr + sbase, sa)
    tl.store(scr_s_ptr + sbase + KP, sb)
    tl.store(scr_i_ptr + sbase, ia.to(tl.int32))
    tl.store(scr_i_ptr + sbase + KP, ib.to(tl.int32))
    tl.debug_barrier()
    pi = tl.load(pi_ptr + tl.arange(0, NP))
    pj = tl.load(pj_ptr + tl.arange(0, NP))
    pvalid = pi >= 0
    pi = tl.where(pvalid, pi, 0)
    pj = tl.where(pvalid, pj, 0)
    gbase = rows[:, None] * (2 * KP)
    ga = tl.load(scr_s_ptr + gbase + pi[None, :])
    gb = tl.load(scr_s_ptr + gbase + KP + pj[None, :])
    gia = tl.load(scr_i_ptr + gbase + pi[None, :]).to(tl.int64)
    gib = tl.load(scr_i_ptr + gbase + KP + pj[None, :]).to(tl.int64)
    cand = tl.where(pvalid[None, :], ga + gb, float("-inf"))       # [BLOCK_B, NP]
    cid = gia * N + gib                                            # < 2^31
    packed = (_float_key(cand).to(tl.int64) << 32) | (0x7FFFFFFF - cid)
    top = _top(packed, KP, NP, BLOCK_B, HAS_TOPK)                  # [BLOCK_B, KP]
    score = _key_float((top >> 32).to(tl.int32))
    rid = 0x7FFFFFFF - (top & 0x7FFFFFFF)
    omask = rmask[:, None] & (offs_kp[None, :] < K)
    optr = rows[:, None] * K + offs_kp[None, :]
    tl.store(out_s_ptr + optr, score, mask=omask)
    tl.store(out_i_ptr + optr, rid, mask=omask)


_PAIRS: dict = {}


def _pairs(k: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    key = (k, str(device))
    if key not in _PAIRS:
        pi, pj = [], []
        for i in range(k):
            for j in range(k):
                if (i + 1) * (j + 1) <= k:
                    pi.append(i)
                    pj.append(j)
        np_ = max(16, _next_pow2(len(pi)))
        pad = np_ - len(pi)
        pi_t = torch.tensor(pi + [-1] * pad, dtype=torch.int32, device=device)
        pj_t = torch.tensor(pj + [-1] * pad, dtype=torch.int32, device=device)
        _PAIRS[key] = (pi_t, pj_t, np_)
    return _PAIRS[key]


def _pk_config(n: int, k: int, d: int, dtype: torch.dtype = torch.float32):
    """(BLOCK_B, CHUNK_N, BLOCK_DK, num_warps). Measured on an H100 at 16384 queries,
    n = 1024, k = 32, d = 64 (benchmarks/KERNEL_NOTES.md): fp32 CHUNK_N 64 1.81 ms
    (128: 1.88, 256: 3.97); bf16 CHUNK_N 256 2.02 ms (128: 2.11, 64: 2.51)."""
    kp = max(2, _next_pow2(k))
    target = 64 if dtype == torch.float32 else 256
    chunk = max(kp, min(target, max(16, _next_pow2(n))))
    return 16, chunk, min(max(16, _next_pow2(d)), 64), 4


def pk_search_supported(n: int, k: int) -> bool:
    return 1 <= n and 1 <= k <= 64 and n * n >= k and n * n < 2 ** 31


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
    kp = max(2, _next_pow2(k))
    block_b, chunk, block_dk, num_warps = config or _pk_config(n, k, d, dt)
    chunk = max(chunk, kp)
    pi, pj, np_ = _pairs(k, dev)
    np_ = max(np_, kp)
    if pi.numel() < np_:
        pi = torch.cat([pi, pi.new_full((np_ - pi.numel(),), -1)])
        pj = torch.cat([pj, pj.new_full((np_ - pj.numel(),), -1)])
    nprog = triton.cdiv(B, block_b)
    scr_s = torch.empty((nprog * block_b, 2 * kp), dtype=torch.float32, device=dev)
    scr_i = torch.empty((nprog * block_b, 2 * kp), dtype=torch.int32, device=dev)
    _pk_search_kernel[(nprog,)](qa, qb, ca, cb, ba, bb, pi, pj, scr_s, scr_i, out_s, out_i, B, n, d,
                                qa.stride(0), qb.stride(0), ca.stride(0), cb.stride(0), k,
                                HAS_BIAS=has_bias, IEEE=(dt == torch.float32), BLOCK_B=block_b,
                                CHUNK_N=chunk, BLOCK_DK=block_dk, KP=kp, NP=np_, HAS_TOPK=_HAS_TOPK,
                                num_warps=num_warps)
    return out_s, out_i
