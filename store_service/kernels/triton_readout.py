"""Triton kernels for the knowledge readout, forward and backward.

Forward (one launch): one program per (token, slice of d_v). It loads the
token's k ids (and scores, for the fused softmax), and for each d-chunk loads
a [BLOCK_K, BLOCK_D] tile of gathered rows, scales by the weights and reduces
over k in fp32. The T x k x d_v gathered tensor never exists in memory.

Backward: the (t, j) pairs are sorted by row id (torch radix sort on int32
keys, padding mapped to a sentinel that sorts last); a flag kernel + nonzero
gives the segment bounds (the one host sync: U is data-dependent), and one
program per unique row (per d-slice) walks its segment:
    row_grad[u] = sum_{(t,j) in seg(u)} w_tj * g_t          (segmented sum)
    grad_w[t,j] = g_t . v_u                                  (fused: v_u is
                                                              loaded once per
                                                              unique row)
Programs run in first-occurrence order so that concurrent programs share g
rows in L2. No atomics, no dense N x d_v buffer: the output is (unique ids
[U] sorted, row grads [U, d_v] fp32). For the fused softmax, grad_scores =
w * (gw - sum_j w_j gw_j) is a small [T, k] epilogue kernel.

That backward (the "first-occurrence" pipeline) suits batches that reuse rows little.
Where there are at least as many (t, j) pairs as table rows, so rows are reused and hot
rows make long segments, a second pipeline runs by default, with the same outputs and
no per-segment walk: triton_readout_chunked.py (the rule, and how to force either:
triton_readout_chunked.backward_pipeline). The sort stage both share:
triton_readout_sort.py.

Their timings against the copy bandwidth, and the variants tried:
benchmarks/KERNEL_NOTES.md.

Everything accumulates in fp32; values may be fp32 or bf16 (or fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the sort stage is shared with the chunked backward (triton_readout_chunked.py)
from .triton_readout_sort import _bwd_prep_kernel, _next_pow2, _start_flags_kernel  # noqa: F401
from .triton_readout_chunked import ChunkedConfig, backward_pipeline, readout_backward_chunked


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------

@triton.jit
def _readout_fwd_kernel(values_ptr, ids_ptr, w_ptr, out_ptr,
                        K, D, stride_v,
                        SOFTMAX: tl.constexpr, K_PAD: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        D_PER_PROG: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    row_base = t * K
    if SOFTMAX:
        offs_kp = tl.arange(0, K_PAD)
        kp_mask = offs_kp < K
        idk = tl.load(ids_ptr + row_base + offs_kp, mask=kp_mask, other=-1)
        s = tl.load(w_ptr + row_base + offs_kp, mask=kp_mask, other=0.0).to(tl.float32)
        s = tl.where(idk >= 0, s, float("-inf"))
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        den = tl.sum(tl.exp(s - m), axis=0)
        inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    for dd in tl.static_range(0, D_PER_PROG, BLOCK_D):
        offs_d = pd * D_PER_PROG + dd + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in tl.static_range(0, K_PAD, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            idx = tl.load(ids_ptr + row_base + offs_k, mask=kmask, other=-1)
            valid = idx >= 0
            w = tl.load(w_ptr + row_base + offs_k, mask=kmask, other=0.0).to(tl.float32)
            if SOFTMAX:
                w = tl.exp(w - m) * inv
            w = tl.where(valid, w, 0.0)
            rows = tl.load(values_ptr + idx[:, None] * stride_v + offs_d[None, :],
                           mask=valid[:, None] & dmask[None, :], other=0.0)
            acc += tl.sum(rows.to(tl.float32) * w[:, None], axis=0)
        tl.store(out_ptr + t * D + offs_d, acc, mask=dmask)


def _fwd_config(K: int, D: int, dtype: torch.dtype):
    """(BLOCK_K, BLOCK_D, D_PER_PROG, num_warps)."""
    # one whole row per step: the fastest of the tiles timed at d_v = 1024
    # (benchmarks/KERNEL_NOTES.md)
    return 1, 1024, 1024, 4


def _check(values: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
    if values.dim() != 2 or ids.dim() != 2 or w.shape != ids.shape:
        raise ValueError(f"bad shapes values {tuple(values.shape)} ids {tuple(ids.shape)} w {tuple(w.shape)}")
    if values.stride(1) != 1:
        raise ValueError("values must be contiguous along d_v")


def _readout_forward(values, ids, w, softmax: bool, config=None):
    _check(values, ids, w)
    T, K = ids.shape
    D = values.shape[1]
    out = torch.empty((T, D), dtype=torch.float32, device=values.device)
    if T == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    ids = ids.contiguous()
    w = w.contiguous()
    block_k, block_d, d_per_prog, num_warps = config or _fwd_config(K, D, values.dtype)
    k_pad = _next_pow2(max(K, 1))
    block_k = min(block_k, k_pad)
    block_d = min(block_d, _next_pow2(D))
    d_per_prog = max(min(d_per_prog, _next_pow2(D)), block_d)
    grid = (T, triton.cdiv(D, d_per_prog))
    _readout_fwd_kernel[grid](values, ids, w, out, K, D, values.stride(0),
                              SOFTMAX=softmax, K_PAD=k_pad, BLOCK_K=block_k, BLOCK_D=block_d,
                              D_PER_PROG=d_per_prog, num_warps=num_warps)
    return out


def readout_weighted_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                            config=None) -> torch.Tensor:
    """[T, d_v] fp32 = sum_j weights[t, j] * values[ids[t, j]] (ids -1 = padding)."""
    return _readout_forward(values, ids, weights, softmax=False, config=config)


def softmax_readout_triton(values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                           config=None) -> torch.Tensor:
    """Fused gather + masked softmax + weighted sum: [T, d_v] fp32."""
    return _readout_forward(values, ids, scores, softmax=True, config=config)


# ----------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------

@triton.jit
def _seg_flags_kernel(skey_ptr, flag_ptr, TK, SENT, BLOCK: tl.constexpr):
    """flag[i], i in [0, TK]: i starts a segment of a real id, or i is the end
    of the real ids (first padding slot, or TK). nonzero(flag) = U + 1 bounds."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cur = tl.load(skey_ptr + offs, mask=offs < TK, other=SENT)
    prev = tl.load(skey_ptr + offs - 1, mask=(offs >= 1) & (offs <= TK), other=SENT)
    first = offs == 0
    start_real = (cur != SENT) & (first | (cur != prev))
    end_mark = (cur == SENT) & (first | (prev != SENT))
    tl.store(flag_ptr + offs, (start_real | end_mark).to(tl.int8), mask=offs <= TK)


@triton.jit
def _first_map_kernel(perm_ptr, bounds_ptr, first_ptr, U, BLOCK: tl.constexpr):
    """first[p] = u where pair p is the first (lowest) occurrence of unique row u."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < U
    start = tl.load(bounds_ptr + offs, mask=m, other=0)
    p = tl.load(perm_ptr + start, mask=m, other=0)
    tl.store(first_ptr + p, offs, mask=m)


@triton.jit
def _row_grad_kernel(values_ptr, g_ptr, w_ptr, perm_ptr, skey_ptr, bounds_ptr, first_ptr, uniq_ptr,
                     rg_ptr, gw_ptr, TK, K, D, stride_v, stride_g,
                     BLOCK_D: tl.constexpr, ORDERED: tl.constexpr, HINTS: tl.constexpr):
    """One program per (unique row u, d-slice) walks the row's segment of the
    sorted (t, j) pairs:
        row_grad[u] = sum w_tj * g_t        grad_w[t, j] (partial over the d-slice) = g_t . v_u
    v_u is read once per unique row; no atomics: each output has one writer.
    ORDERED: program i handles the row whose first occurrence is pair i (and
    exits if pair i is no first occurrence), so programs running together read
    the same few g rows: g is gathered ~k times per token and does not fit in
    L2 otherwise (benchmarks/KERNEL_NOTES.md)."""
    i = tl.program_id(0)
    pd = tl.program_id(1)
    if ORDERED:
        u = tl.load(first_ptr + i)
    else:
        u = i
    if u >= 0:
        start = tl.load(bounds_ptr + u)
        end = tl.load(bounds_ptr + u + 1)
        row = tl.load(skey_ptr + start).to(tl.int64)
        tl.store(uniq_ptr + u, row, mask=pd == 0)
        offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        if HINTS:
            v = tl.load(values_ptr + row * stride_v + offs_d, mask=dmask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        else:
            v = tl.load(values_ptr + row * stride_v + offs_d, mask=dmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        gw_base = gw_ptr + pd.to(tl.int64) * TK
        for q in range(start, end):
            p = tl.load(perm_ptr + q)
            t = p // K
            w = tl.load(w_ptr + p)
            if HINTS:
                g = tl.load(g_ptr + t * stride_g + offs_d, mask=dmask, other=0.0,
                            eviction_policy="evict_last").to(tl.float32)
            else:
                g = tl.load(g_ptr + t * stride_g + offs_d, mask=dmask, other=0.0).to(tl.float32)
            acc += w * g
            tl.store(gw_base + p, tl.sum(g * v, axis=0))
        if HINTS:
            tl.store(rg_ptr + u.to(tl.int64) * D + offs_d, acc, mask=dmask, cache_modifier=".cs")
        else:
            tl.store(rg_ptr + u.to(tl.int64) * D + offs_d, acc, mask=dmask)


@triton.jit
def _row_grad_rows_kernel(values_ptr, g_ptr, w_ptr, perm_ptr, skey_ptr, bounds_ptr, first_ptr, uniq_ptr,
                          rg_ptr, gw_ptr, TK, K, D, stride_v, stride_g,
                          BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """As _row_grad_kernel (ORDERED, HINTS) but ROWS unique rows per program,
    their loads issued together ([ROWS, BLOCK_D] tiles, one row per warp when
    num_warps == ROWS): more independent loads in flight per program; v kept
    in its storage dtype to save registers."""
    i = tl.program_id(0)
    pd = tl.program_id(1)
    slot = i.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    u = tl.load(first_ptr + slot, mask=slot < TK, other=-1)
    valid = u >= 0
    u = tl.where(valid, u, 0)
    start = tl.load(bounds_ptr + u, mask=valid, other=0)
    end = tl.load(bounds_ptr + u + 1, mask=valid, other=0)
    row = tl.load(skey_ptr + start, mask=valid, other=0).to(tl.int64)
    tl.store(uniq_ptr + u, row, mask=valid & ((u * 0 + pd) == 0))
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    m2 = valid[:, None] & dmask[None, :]
    v = tl.load(values_ptr + row[:, None] * stride_v + offs_d[None, :], mask=m2, other=0.0,
                eviction_policy="evict_first")
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    gw_base = gw_ptr + pd.to(tl.int64) * TK
    n_max = tl.max(end - start, axis=0)
    for c in range(0, n_max):
        q = start + c
        m = valid & (q < end)
        p = tl.load(perm_ptr + q, mask=m, other=0)
        t = p // K
        w = tl.load(w_ptr + p, mask=m, other=0.0)
        g = tl.load(g_ptr + t[:, None] * stride_g + offs_d[None, :], mask=m[:, None] & dmask[None, :],
                    other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc += w[:, None] * g
        tl.store(gw_base + p, tl.sum(g * v.to(tl.float32), axis=1), mask=m)
    tl.store(rg_ptr + u.to(tl.int64)[:, None] * D + offs_d[None, :], acc, mask=m2, cache_modifier=".cs")


# The row-gradient config is fixed, not tuned on the first call: a tuner times the first
# (often small) problem and can pick a config that is slower at the sizes that matter
# (the configs timed: benchmarks/KERNEL_NOTES.md).
def _bwd_config(D: int):
    """Default (BLOCK_D, num_warps, ORDERED, HINTS, ROWS): the fastest timed at d_v = 1024
    (benchmarks/KERNEL_NOTES.md)."""
    return min(_next_pow2(D), 1024), 2, True, True, 1


def _launch_row_grad(cfg, values, g, w, perm, skey, bounds, uniq, row_grads, gw_part, TK, K, D):
    block_d, num_warps, ordered, hints = cfg[:4]
    rows = cfg[4] if len(cfg) > 4 else 1
    block_d = min(block_d, _next_pow2(D))
    n_dblk = triton.cdiv(D, block_d)
    U = bounds.numel() - 1
    if ordered or rows > 1:
        first = torch.full((TK,), -1, dtype=torch.int32, device=values.device)
        _first_map_kernel[(triton.cdiv(U, 1024),)](perm, bounds, first, U, BLOCK=1024)
    else:
        first = bounds  # unused
    if rows > 1:
        _row_grad_rows_kernel[(triton.cdiv(TK, rows), n_dblk)](
            values, g, w, perm, skey, bounds, first, uniq, row_grads, gw_part, TK, K, D,
            values.stride(0), g.stride(0), BLOCK_D=block_d, ROWS=rows, num_warps=num_warps)
    else:
        _row_grad_kernel[(TK if ordered else U, n_dblk)](
            values, g, w, perm, skey, bounds, first, uniq, row_grads, gw_part, TK, K, D,
            values.stride(0), g.stride(0), BLOCK_D=block_d, ORDERED=ordered, HINTS=hints,
            num_warps=num_warps)


def _segments(ids: torch.Tensor, n_rows: int):
    """Sort the flat (t, j) pairs by row id (padding -> a sentinel that sorts
    last). Returns (sorted keys, perm int64 [TK], bounds int64 [U + 1]):
    unique row u owns sorted positions bounds[u] .. bounds[u+1]-1."""
    flat = ids.reshape(-1)
    TK = flat.numel()
    if n_rows < 2 ** 31 - 1:
        sentinel = 2 ** 31 - 1
        key = torch.where(flat >= 0, flat, sentinel).to(torch.int32)
    else:
        sentinel = 2 ** 63 - 1
        key = torch.where(flat >= 0, flat, sentinel)
    skey, perm = torch.sort(key)  # radix sort; order inside a segment does not matter
    flag = torch.empty(TK + 1, dtype=torch.int8, device=flat.device)
    BLOCK = 1024
    _seg_flags_kernel[(triton.cdiv(TK + 1, BLOCK),)](skey, flag, TK, sentinel, BLOCK=BLOCK)
    bounds = torch.nonzero(flag).view(-1)  # the one host sync: U is data-dependent
    return skey, perm, bounds



@triton.jit
def _first_occurrence_kernel(skey_ptr, perm_ptr, csum_ptr, uniq_ptr, fo_u_ptr, fo_cnt_ptr, fo_start_ptr,
                             TK, SENT, BLOCK: tl.constexpr):
    """For each segment start i (output slot u = csum[i] - 1): walk the segment
    (1.27 pairs on average at the benchmark shape) for its length and its
    lowest pair p, and file the segment under p: fo_u[p] = u, fo_cnt[p] =
    length, fo_start[p] = i. uniq[u] = the row id."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < TK
    cur = tl.load(skey_ptr + offs, mask=m, other=SENT)
    prev = tl.load(skey_ptr + offs - 1, mask=m & (offs >= 1), other=SENT)
    start = m & (cur != SENT) & ((offs == 0) | (cur != prev))
    u = tl.load(csum_ptr + offs, mask=start, other=1) - 1
    pmin = tl.load(perm_ptr + offs, mask=start, other=0)
    length = start.to(tl.int32)
    active = start
    while tl.max(active.to(tl.int32), axis=0) > 0:
        q = offs + length
        nxt = tl.load(skey_ptr + q, mask=active & (q < TK), other=SENT)
        same = active & (nxt == cur)
        p = tl.load(perm_ptr + q, mask=same, other=0)
        pmin = tl.where(same & (p < pmin), p, pmin)
        length += same.to(tl.int32)
        active = same
    tl.store(uniq_ptr + u, cur.to(tl.int64), mask=start)
    tl.store(fo_u_ptr + pmin, u, mask=start)
    tl.store(fo_cnt_ptr + pmin, length, mask=start)
    tl.store(fo_start_ptr + pmin, offs.to(tl.int32), mask=start)


@triton.jit
def _row_grad_first_kernel(values_ptr, ids_ptr, g_ptr, w_ptr, perm_ptr, fo_u_ptr, fo_cnt_ptr, fo_start_ptr,
                           rg_ptr, gw_ptr, TK, K, D, stride_v, stride_g, BLOCK_D: tl.constexpr,
                           G_EARLY: tl.constexpr, HINTS: tl.constexpr):
    """One program per (t, j) pair i. If i is its row's first occurrence, the
    program owns the row:  row_grad[u] = sum over the row's pairs of w * g_t,
    grad_w[p] = g_t . v_row for each of them. Pair i's own token, weight and row
    id are known without the sort, so the common case (a row used once: most rows
    at the benchmark shape, KERNEL_NOTES.md) is two dependent loads deep (ids -> v), as the
    forward; only rows used more than once walk their sorted segment."""
    i = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    cnt = tl.load(fo_cnt_ptr + i)
    u = tl.load(fo_u_ptr + i).to(tl.int64)
    row = tl.load(ids_ptr + i)
    w = tl.load(w_ptr + i)
    g_ptrs = g_ptr + (i // K) * stride_g + offs_d
    if G_EARLY:
        # issued before the branch (a pair that owns no row wastes an L2 hit: its
        # token's g row is read by the token's other programs anyway)
        if HINTS:
            g = tl.load(g_ptrs, mask=dmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        else:
            g = tl.load(g_ptrs, mask=dmask, other=0.0).to(tl.float32)
    if cnt > 0:
        if not G_EARLY:
            g = tl.load(g_ptrs, mask=dmask, other=0.0).to(tl.float32)
        if HINTS:
            v = tl.load(values_ptr + row * stride_v + offs_d, mask=dmask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        else:
            v = tl.load(values_ptr + row * stride_v + offs_d, mask=dmask, other=0.0).to(tl.float32)
        acc = w * g
        gw_base = gw_ptr + pd.to(tl.int64) * TK
        tl.store(gw_base + i, tl.sum(g * v, axis=0))
        if cnt > 1:
            start = tl.load(fo_start_ptr + i)
            for q in range(start, start + cnt):
                p = tl.load(perm_ptr + q)
                if p != i:
                    w2 = tl.load(w_ptr + p)
                    g2 = tl.load(g_ptr + (p // K) * stride_g + offs_d, mask=dmask, other=0.0).to(tl.float32)
                    acc += w2 * g2
                    tl.store(gw_base + p, tl.sum(g2 * v, axis=0))
        if HINTS:
            tl.store(rg_ptr + u * D + offs_d, acc, mask=dmask, cache_modifier=".cs")
        else:
            tl.store(rg_ptr + u * D + offs_d, acc, mask=dmask)


def _fo_config(D: int):
    """(BLOCK_D, num_warps, G_EARLY, HINTS) of the row-gradient kernel: the fastest timed at
    d_v = 1024 (benchmarks/KERNEL_NOTES.md)."""
    return min(_next_pow2(D), 1024), 2, True, True


def _readout_backward(values, ids, w, grad_out, config=None, softmax=False):
    """-> (grad_w [T, K] fp32, w [T, K] fp32, unique-id buffer, row-grad buffer, csum): _trim
    (the host sync) cuts the buffers to (unique ids [U] sorted, row grads [U, D] fp32).

    w: the weights, or (softmax=True) the scores, whose masked softmax is recomputed here.
    Sort the flat (t, j) pairs by row id (padding -> a sentinel that sorts last),
    number the segments by a prefix sum, file each segment under its first pair,
    and let the program of that pair compute the row's gradient. Everything is
    enqueued before the one host sync (U, to size the outputs) at the end: the
    row grads are written into a [min(T*k, N), D] buffer of which the first U rows
    are returned (a view), so no kernel waits on the host. Few launches and
    allocations on purpose: at the benchmark shape the host's launch time counts
    (benchmarks/KERNEL_NOTES.md).
    config: optional (BLOCK_D, num_warps[, G_EARLY, HINTS]) of the row-gradient kernel."""
    T, K = ids.shape
    D = values.shape[1]
    N = values.shape[0]
    dev = values.device
    TK = T * K
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    w = w.contiguous()
    ids = ids.contiguous()
    flat = ids.reshape(-1)
    cfg = tuple(config or _fo_config(D))
    block_d, num_warps, g_early, hints = (cfg + (True, True))[:4]
    block_d = min(block_d, _next_pow2(D))
    n_dblk = triton.cdiv(D, block_d) if D else 0
    # int32 work space: sort keys, segment flags, and per pair: slot, segment start;
    # zeroed: per pair segment length (0 = owns no row), then grad_w partials (fp32 zeros)
    ws = torch.empty((4, TK), dtype=torch.int32, device=dev)
    zs = torch.zeros((1 + max(n_dblk, 1), TK), dtype=torch.int32, device=dev)
    flag, fo_u, fo_start = ws[1], ws[2], ws[3]
    fo_cnt, gw_part = zs[0], zs[1:].view(torch.float32)
    if N < 2 ** 31 - 1:
        sentinel = 2 ** 31 - 1
        key = ws[0]
    else:
        sentinel = 2 ** 63 - 1
        key = torch.empty(TK, dtype=torch.int64, device=dev)
    weights = torch.empty((T, K), dtype=torch.float32, device=dev) if softmax else w.float()
    if TK:
        _bwd_prep_kernel[(T,)](w, ids, weights, key, K, sentinel, K_PAD=_next_pow2(K), SOFTMAX=softmax,
                               num_warps=1)
    skey, perm = torch.sort(key)  # radix sort; order inside a segment does not matter
    BLOCK = 1024
    nblk = triton.cdiv(TK, BLOCK)
    if TK:
        _start_flags_kernel[(nblk,)](skey, flag, TK, sentinel, BLOCK=BLOCK)
    csum = torch.cumsum(flag, 0, dtype=torch.int32)
    cap = min(TK, N)
    uniq = torch.empty(cap, dtype=torch.int64, device=dev)
    if TK:
        _first_occurrence_kernel[(nblk,)](skey, perm, csum, uniq, fo_u, fo_cnt, fo_start, TK, sentinel,
                                          BLOCK=BLOCK)
    row_grads = torch.empty((cap, D), dtype=torch.float32, device=dev)
    if TK and D:
        _row_grad_first_kernel[(TK, n_dblk)](values, flat, g, weights, perm, fo_u, fo_cnt, fo_start, row_grads,
                                             gw_part, TK, K, D, values.stride(0), g.stride(0), BLOCK_D=block_d,
                                             G_EARLY=g_early, HINTS=hints, num_warps=num_warps)
    grad_w = gw_part[0] if n_dblk <= 1 else gw_part.sum(0)
    return grad_w.reshape(T, K), weights, uniq, row_grads, csum


def _trim(uniq, row_grads, csum):
    """The one host sync (U), once the caller has enqueued its last kernel."""
    U = int(csum[-1]) if csum.numel() else 0
    return uniq[:U], row_grads[:U]


def _readout_backward_sorted(values, ids, w, grad_out, config=None):
    """The previous pipeline (sort, nonzero bounds with a host sync in the middle, a
    first-occurrence map, one program per unique row reading its segment): kept as the
    benchmark's comparison for _readout_backward.
    -> (grad_w [T, K] fp32, unique ids [U], row grads [U, D] fp32) for given weights w.
    config: optional (BLOCK_D, num_warps, ORDERED, HINTS[, ROWS]) of the row-gradient kernel."""
    T, K = ids.shape
    D = values.shape[1]
    dev = values.device
    TK = T * K
    g = grad_out
    if g.stride(-1) != 1:
        g = g.contiguous()
    w = w.contiguous().reshape(-1)
    skey, perm, bounds = _segments(ids, values.shape[0])
    U = bounds.numel() - 1
    block_d = min(_next_pow2(D), 1024) if config is None else min(config[0], _next_pow2(D))
    n_dblk = triton.cdiv(D, block_d) if D else 0
    uniq = torch.empty(U, dtype=torch.int64, device=dev)
    row_grads = torch.empty((U, D), dtype=torch.float32, device=dev)
    gw_part = torch.zeros((max(n_dblk, 1), TK), dtype=torch.float32, device=dev)
    if U and D:
        _launch_row_grad(config or _bwd_config(D), values, g, w, perm, skey, bounds, uniq, row_grads,
                         gw_part, TK, K, D)
    elif U:
        uniq.copy_(skey[bounds[:-1]])
    grad_w = gw_part[0] if n_dblk <= 1 else gw_part.sum(0)
    return grad_w.reshape(T, K), uniq, row_grads


def _backward(values, ids, w, grad_out, config, softmax, pipeline):
    """The chosen pipeline's (grad_w, weights, uniq buffer, row-grad buffer, csum).
    pipeline: 'first' | 'chunked' | 'auto' | None (then $KSTORE_READOUT_BWD, default auto:
    triton_readout_chunked.backward_pipeline). config: a ChunkedConfig runs the chunked
    pipeline, a tuple the first-occurrence one (its row-gradient kernel's config)."""
    if pipeline is None and config is not None:
        pipeline = "chunked" if isinstance(config, ChunkedConfig) else "first"
    T, K = ids.shape
    if backward_pipeline(T, K, values.shape[0], pipeline) == "chunked":
        if config is not None and not isinstance(config, ChunkedConfig):
            raise ValueError(f"the chunked backward takes a ChunkedConfig, not {config!r}")
        return readout_backward_chunked(values, ids, w, grad_out, config, softmax=softmax)
    if isinstance(config, ChunkedConfig):
        raise ValueError("a ChunkedConfig given to the first-occurrence backward")
    return _readout_backward(values, ids, w, grad_out, config, softmax=softmax)


def readout_weighted_backward_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                     grad_out: torch.Tensor, config=None, pipeline: str | None = None
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_weights [T, k] fp32, unique ids [U] int64 sorted, row grads [U, d_v] fp32).
    pipeline / config: see _backward."""
    _check(values, ids, weights)
    grad_w, _, uniq, row_grads, csum = _backward(values, ids, weights.float(), grad_out, config, False, pipeline)
    return (grad_w, *_trim(uniq, row_grads, csum))


@triton.jit
def _softmax_kernel(s_ptr, ids_ptr, w_ptr, K, K_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, K_PAD)
    mask = offs < K
    idk = tl.load(ids_ptr + t * K + offs, mask=mask, other=-1)
    s = tl.load(s_ptr + t * K + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.where(idk >= 0, s, float("-inf"))
    m = tl.max(s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(s - m)
    den = tl.sum(e, axis=0)
    inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(w_ptr + t * K + offs, e * inv, mask=mask)


@triton.jit
def _softmax_bwd_kernel(w_ptr, gw_ptr, gs_ptr, K, K_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, K_PAD)
    mask = offs < K
    w = tl.load(w_ptr + t * K + offs, mask=mask, other=0.0)
    gw = tl.load(gw_ptr + t * K + offs, mask=mask, other=0.0)
    dot = tl.sum(w * gw, axis=0)
    tl.store(gs_ptr + t * K + offs, w * (gw - dot), mask=mask)


def masked_softmax_triton(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    T, K = ids.shape
    w = torch.empty((T, K), dtype=torch.float32, device=scores.device)
    if T and K:
        _softmax_kernel[(T,)](scores.contiguous(), ids.contiguous(), w, K, K_PAD=_next_pow2(K),
                              num_warps=1)
    return w


def softmax_readout_backward_triton(values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                                    grad_out: torch.Tensor, config=None, pipeline: str | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_scores [T, k] fp32, unique ids [U] int64 sorted, row grads [U, d_v] fp32).
    pipeline / config: see _backward."""
    _check(values, ids, scores)
    T, K = ids.shape
    grad_w, w, uniq, row_grads, csum = _backward(values, ids, scores, grad_out, config, True, pipeline)
    grad_s = torch.empty_like(w)
    if T and K:
        _softmax_bwd_kernel[(T,)](w, grad_w, grad_s, K, K_PAD=_next_pow2(K), num_warps=1)
    return (grad_s, *_trim(uniq, row_grads, csum))
