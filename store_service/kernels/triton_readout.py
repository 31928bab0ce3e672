"""Triton kernels for the knowledge readout, forward and backward.

Forward (one launch): one program per (token, slice of d_v). It loads the
token's k ids (and scores, for the fused softmax), and for each d-chunk loads
a [BLOCK_K, BLOCK_D] tile of gathered rows, scales by the weights and reduces
over k in fp32. The T x k x d_v gathered tensor never exists in memory.

Backward ("first-occurrence" pipeline): the (t, j) pairs are sorted by row id (torch
radix sort on int32 keys, padding mapped to a sentinel that sorts last), start flags and
a prefix sum number the rows' segments, each segment is filed under its first pair, and
that pair's program owns the row:
    row_grad[u] = sum_{(t,j) in seg(u)} w_tj * g_t          (segmented sum)
    grad_w[t,j] = g_t . v_u                                  (v_u loaded once a row)
Everything is enqueued before the one host sync (_trim: U is data-dependent). No
atomics, no dense N x d_v buffer: the output is (unique ids [U] sorted, row grads
[U, d_v] fp32). For the fused softmax, grad_scores = w * (gw - sum_j w_j gw_j) is a
small [T, k] epilogue kernel. The pipeline before it (segment bounds by nonzero, one
program per unique row) is kept as the benchmark's comparison: triton_readout_sorted.py.

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
from .triton_readout_sort import _bwd_prep_kernel, _next_pow2, _start_flags_kernel, masked_softmax  # noqa: F401
from .triton_readout_chunked import ChunkedConfig, backward_pipeline, readout_backward_chunked
from .triton_readout_sorted import _readout_backward_sorted  # noqa: F401  (the benchmark's comparison)


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
    tl.store(w_ptr + t * K + offs, masked_softmax(s, idk), mask=mask)


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
