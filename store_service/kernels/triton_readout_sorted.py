"""The previous readout backward pipeline, kept as benchmarks/kernels.py's comparison
(and tested against the reference): sort the (t, j) pairs by row id, segment bounds by
nonzero (a host sync in the middle of the pipeline), a first-occurrence map, and one
program per unique row reading its segment. triton_readout.py's pipelines replaced it
(benchmarks/KERNEL_NOTES.md has the timings)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_readout_sort import _next_pow2


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
