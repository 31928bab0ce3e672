"""Exact product-key search: cuBLAS scores, Triton selection.

The work splits into two parts of very different kinds:
  * the dots (B x n x d per half): a GEMM. torch's matmul runs them, with
    exactly the reference's expression, so the scores are bit-identical to
    the reference's and the ids can be compared exactly;
  * the selection (top-k of n per half, then top-k of the k x k candidate
    sums): neither FLOPs nor bytes but instructions. One Triton program per
    query, one warp: the n scores sit in the warp's registers, so every
    reduction is in-thread adds plus warp shuffles (an earlier fused kernel
    with 16 queries per program spent its time in cross-warp reductions and
    int64 bitonic sorts; benchmarks/KERNEL_NOTES.md).

Selection without sorting: the scores are mapped to order-preserving int32
keys and a threshold is found by bisection over the 32-bit range (counts of
`key >= mid`, each a warp reduction; it stops as soon as exactly k keys reach
the threshold, else at the k-th largest key). Keys above it are taken,
then ties at it in index order until k are taken (ties go to the smaller
id). The chosen entries are compacted by a prefix sum through a per-query
scratch row, so each half's top-k stays in index order: the candidate sums
(i, j) then run in row-id order, which makes the same tie rule hold for the
final top-k. The final k are ranked (k x k compares) and written sorted.
Ablation masks are not handled here (the dispatcher uses the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


_KEY_PAD = -2 ** 31  # below the key of -inf: padding lanes never win


@triton.jit
def _float_key(x):
    """fp32 -> int32 with the same order (signed compare)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _select(key, K):
    """Mask of the K largest int32 keys (K >= 1, at most the number of real keys;
    ties at the threshold go to the lowest positions).

    Bisection for a threshold lo with count(key >= lo) >= K, over [min, max of
    the keys], stopping as soon as exactly K keys reach it: with distinct scores
    that happens once the interval falls between the K-th and (K+1)-th key,
    about half of the 32 steps a full bisection takes."""
    lo = tl.zeros([], tl.int64) - 2147483648
    hi = tl.max(key, axis=0).to(tl.int64)
    cnt_lo = tl.sum((key >= lo.to(tl.int32)).to(tl.int32), axis=0)
    while (cnt_lo != K) & (lo < hi):
        mid = (lo + hi + 1) >> 1
        cnt = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ok = cnt >= K
        lo = tl.where(ok, mid, lo)
        cnt_lo = tl.where(ok, cnt, cnt_lo)
        hi = tl.where(ok, hi, mid - 1)
    # count(key >= lo) == K, or lo is the K-th largest key with ties at it
    thr = lo.to(tl.int32)
    above = key > thr
    need = K - tl.sum(above.to(tl.int32), axis=0)
    tie = key == thr
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    return above | (tie & (tie_rank <= need))


@triton.jit
def _half_topk(s_ptr, row, N, C, scr_s, scr_i, NP: tl.constexpr):
    """Top-C of one half's N scores (row `row` of s_ptr), written in index order
    to scr_s / scr_i [C]."""
    offs = tl.arange(0, NP)
    m = offs < N
    s = tl.load(s_ptr + row * N + offs, mask=m, other=0.0)
    key = tl.where(m, _float_key(s), -2147483648)
    sel = _select(key, C)
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(scr_s + pos, s, mask=sel)
    tl.store(scr_i + pos, offs, mask=sel)


@triton.jit
def _pk_select_kernel(sa_ptr, sb_ptr, scr_s_ptr, scr_i_ptr, out_s_ptr, out_i_ptr,
                      NA, NB, CA, CB, K,
                      NPA: tl.constexpr, NPB: tl.constexpr, KPA: tl.constexpr, KPB: tl.constexpr,
                      KP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    SCR: tl.constexpr = KPA + KPB + KP
    base_s = scr_s_ptr + row * SCR
    base_i = scr_i_ptr + row * SCR
    _half_topk(sa_ptr, row, NA, CA, base_s, base_i, NPA)
    _half_topk(sb_ptr, row, NB, CB, base_s + KPA, base_i + KPA, NPB)
    tl.debug_barrier()
    offs_a = tl.arange(0, KPA)
    offs_b = tl.arange(0, KPB)
    va = offs_a < CA
    vb = offs_b < CB
    ta = tl.load(base_s + offs_a, mask=va, other=0.0)
    tb = tl.load(base_s + KPA + offs_b, mask=vb, other=0.0)
    ia = tl.load(base_i + offs_a, mask=va, other=0).to(tl.int64)
    ib = tl.load(base_i + KPA + offs_b, mask=vb, other=0).to(tl.int64)
    # the reference's candidate sums, in row-id order (ia, ib ascending)
    cand = tl.reshape(ta[:, None] + tb[None, :], [KPA * KPB])
    cid = tl.reshape(ia[:, None] * NB + ib[None, :], [KPA * KPB])
    cvalid = tl.reshape(va[:, None] & vb[None, :], [KPA * KPB])
    ckey = tl.where(cvalid, _float_key(cand), -2147483648)
    sel = _select(ckey, K)
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(base_s + KPA + KPB + pos, cand, mask=sel)
    tl.store(base_i + KPA + KPB + pos, cid.to(tl.int32), mask=sel)
    tl.debug_barrier()
    # rank the K chosen (descending score, ties -> smaller id) and write them sorted
    offs = tl.arange(0, KP)
    vk = offs < K
    fs = tl.load(base_s + KPA + KPB + offs, mask=vk, other=0.0)
    fi = tl.load(base_i + KPA + KPB + offs, mask=vk, other=0)
    fk = _float_key(fs)
    # beats[i, j]: entry j ranks before entry i
    beats = (fk[None, :] > fk[:, None]) | ((fk[None, :] == fk[:, None]) & (fi[None, :] < fi[:, None]))
    rank = tl.sum((beats & vk[None, :]).to(tl.int32), axis=1)
    tl.store(out_s_ptr + row * K + rank, fs, mask=vk)
    tl.store(out_i_ptr + row * K + rank, fi.to(tl.int64), mask=vk)


def pk_search_supported(na: int, nb: int, k: int) -> bool:
    # scores of one half live in one warp's registers: up to 4096 per half
    return 1 <= na <= 4096 and 1 <= nb <= 4096 and 1 <= k <= 128 and k <= na * nb < 2 ** 31


def _scores(q: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # the reference's expression, so the scores (and the chosen ids) match it exactly
    s = q.float() @ codebook.float().T
    if bias is not None:
        s = s + bias.float()
    return s.contiguous()


def _num_warps(np_: int) -> int:
    return max(1, min(4, np_ // 1024))


def product_key_search_triton(q_a: torch.Tensor, q_b: torch.Tensor, codebook_a: torch.Tensor,
                              codebook_b: torch.Tensor, k: int, bias_a: torch.Tensor | None = None,
                              bias_b: torch.Tensor | None = None, num_warps: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k -> (scores [B, k] fp32 descending, ids [B, k] int64 = i*nb + j),
    PAD_ID / -inf where a -inf bias leaves fewer than k selectable rows."""
    na, nb = codebook_a.shape[0], codebook_b.shape[0]
    B = q_a.shape[0]
    if not pk_search_supported(na, nb, k):
        from .reference import product_key_search_reference
        return product_key_search_reference(q_a, q_b, codebook_a, codebook_b, k, bias_a, bias_b)
    dev = q_a.device
    out_s = torch.empty((B, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((B, k), dtype=torch.int64, device=dev)
    if B == 0:
        return out_s, out_i
    sa = _scores(q_a, codebook_a, bias_a)
    sb = _scores(q_b, codebook_b, bias_b)
    ca, cb = min(k, na), min(k, nb)
    npa, npb = _next_pow2(na), _next_pow2(nb)
    kpa, kpb, kp = _next_pow2(ca), _next_pow2(cb), _next_pow2(k)
    scr_s = torch.empty((B, kpa + kpb + kp), dtype=torch.float32, device=dev)
    scr_i = torch.empty((B, kpa + kpb + kp), dtype=torch.int32, device=dev)
    nw = num_warps or _num_warps(max(npa, npb, kpa * kpb))
    _pk_select_kernel[(B,)](sa, sb, scr_s, scr_i, out_s, out_i, na, nb, ca, cb, k,
                            NPA=npa, NPB=npb, KPA=kpa, KPB=kpb, KP=kp, num_warps=nw)
    if bias_a is not None or bias_b is not None:
        out_i.masked_fill_(torch.isneginf(out_s), -1)
    return out_s, out_i
