"""The readout backward for batches that reuse rows many times: the "chunked" pipeline.

Same outputs as triton_readout.py's backward (grad_w [T, k] fp32, unique ids [U]
sorted, row grads [U, d_v] fp32; see its docstring), built for the other shape.

Why a second pipeline. The first-occurrence pipeline gives each unique row to one
program that walks the row's pairs one after another; that is right where rows are
rarely reused (T=16384, k=32 over 2^20 rows: 1.27 pairs per row,
benchmarks/KERNEL_NOTES.md). A training step of the capacity model reads a small
table hard: T = 32,768 tokens x 4 heads, k = 16 (2.1M pairs) over ~124k rows of
d_v = 128, ~17 pairs per row on average and thousands for the hot rows. There, one
program walking a hot row's segment is thousands of dependent loads in a row, and the
first-occurrence and row-gradient kernels took 6.8 ms each per step on an H100
(benchmarks/results/launch_count_cuda.json). Here no program walks a segment pair by
pair: the work is cut by position in the sorted order, not by row.

The algorithm (deterministic: no atomics, every output has one writer, the sort is
stable so a segment's pairs stay in pair order, and every sum runs in an order fixed
by the code, so two runs give the same bits):
  1. as the other pipeline (triton_readout_sort.py): per-token sort keys (padding ->
     a sentinel that sorts last; softmax weights recomputed), torch radix sort, the
     segment-start flags and their prefix sum: seg[i] = the output slot of the row at
     sorted position i.
  2. _chunk_kernel, grid (ceil(TK / CHUNK), d-blocks of BLOCK_D): CHUNK consecutive
     sorted pairs per program, D_STEP columns at a time as [CHUNK, D_STEP] tiles (the
     tile size bounds the registers): g of the pairs' tokens and the pairs' value rows.
     grad_w of each pair = g_t . v_row (a partial per d-block, summed afterwards as in
     the other pipeline). The weighted g rows are summed per segment by an inclusive
     segmented scan down the chunk (tl.associative_scan, restarting at each segment
     start: plain fp32 adds, no matmul, so no tf32 question); the scan at a segment's
     last position in the chunk is its in-chunk sum. A segment that starts and ends in
     the chunk is written straight into row_grads[seg]. A segment that crosses a chunk
     edge leaves its partial in the chunk's boundary buffer: slot 0 for the segment
     that began in an earlier chunk (its partial up to where it ends, or the whole
     chunk if it spans it), slot 1 for the segment that starts here and continues
     past the chunk. uniq[seg] is written at each segment start.
  3. _carry_kernel, grid (chunks, d-blocks): the chunk holding a slot-1 partial owns
     that segment: to its partial it adds the slot-0 partials of the following chunks,
     SPAN of them per step (their sum, then onto the running total, in chunk order),
     while their first key is still the segment's row, and writes row_grads[seg]. A
     row with n pairs costs ~n / (CHUNK * SPAN) serial steps here instead of n.
Nothing waits on the host: U is only known at the end, from the prefix sum, by
triton_readout._trim (the one host sync); the row grads go into a [min(T*k, N), d_v]
buffer of which the caller keeps the first U rows.

Which pipeline runs: backward_pipeline() below (a static rule on shapes, an env var,
or the caller's choice).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_readout_sort import _bwd_prep_kernel, _next_pow2, _start_flags_kernel

PIPELINE_ENV = "KSTORE_READOUT_BWD"  # chunked | first | auto (default)
PIPELINES = ("first", "chunked")


@dataclass(frozen=True)
class ChunkedConfig:
    """Tiles of the chunked backward. Not timed on a GPU yet; chosen by registers (offline
    compile for sm_90, benchmarks/KERNEL_NOTES.md): chunk x d_step sets the tiles held at
    once (g, the value rows, the scan); [64, 32] with 4 warps: 112 registers, no spills,
    where one [64, 128] tile needed 254 and spilled."""
    chunk: int = 64          # sorted pairs per program (a power of two)
    block_d: int = 128       # d_v columns per program (capped at d_v's next power of two)
    d_step: int = 32         # columns per step of a program's loop over its block_d
    num_warps: int = 4
    carry_span: int = 16     # following chunks' partials the carry kernel adds per step


def backward_pipeline(T: int, K: int, n_rows: int, pipeline: str | None = None) -> str:
    """'chunked' or 'first'. pipeline (or else the env var KSTORE_READOUT_BWD) may force
    either; 'auto' (the default) picks chunked when there are at least as many (t, j)
    pairs as rows in the table: then a used row is read T*k/U >= T*k/N >= 1 times on
    average (~17 at the capacity model's shape) and, as real lookups are skewed, hot
    rows make long segments; the first-occurrence pipeline otherwise (its shape: 0.5
    pairs per table row, 1.27 per used row). A rule on shapes only: deciding on the
    actual reuse would need a host sync."""
    choice = (pipeline or os.environ.get(PIPELINE_ENV) or "auto").lower()
    if choice == "auto":
        return "chunked" if T * K >= n_rows else "first"
    if choice not in PIPELINES:
        raise ValueError(f"readout backward pipeline {choice!r}: expected one of {PIPELINES} or 'auto'")
    return choice


@triton.jit
def _seg_sum(v1, f1, v2, f2):
    """Combine of the segmented sum: f = 'a segment starts here'. Associative: the right
    operand's sum stands alone once a segment starts inside it."""
    return tl.where(f2 != 0, v2, v1 + v2), f1 | f2


@triton.jit
def _chunk_kernel(values_ptr, g_ptr, w_ptr, skey_ptr, perm_ptr, csum_ptr,
                  uniq_ptr, rg_ptr, bnd_ptr, gw_ptr,
                  TK, K, D, stride_v, stride_g, SENT,
                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, D_STEP: tl.constexpr):
    """CHUNK sorted positions x BLOCK_D columns (D_STEP at a time: the [CHUNK, D_STEP]
    tiles bound the registers): grad_w partials of the pairs, the in-chunk segment sums
    (written as row grads, or to the boundary buffer where the segment crosses the
    chunk's edge), and uniq at segment starts."""
    c = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    i0 = c * CHUNK
    offs = i0 + tl.arange(0, CHUNK)
    inb = offs < TK
    key = tl.load(skey_ptr + offs, mask=inb, other=SENT)
    real = key != SENT
    # neighbours in the sorted order (-1: no key, as keys are >= 0)
    prev = tl.load(skey_ptr + offs - 1, mask=inb & (offs >= 1), other=-1)
    nxt = tl.load(skey_ptr + offs + 1, mask=(offs + 1) < TK, other=-1)
    before = tl.load(skey_ptr + i0 - 1, mask=i0 >= 1, other=-1)  # the key before the chunk
    starts = key != prev
    ends = key != nxt
    began_before = key == before          # sorted: the segment began in an earlier chunk
    last_here = ends | (offs == i0 + CHUNK - 1)
    out = real & last_here
    direct = out & ~began_before & ends
    to_first = out & began_before              # slot 0: began before (ends here, or spans)
    to_last = out & ~began_before & ~ends      # slot 1: starts here, continues after
    seg = (tl.load(csum_ptr + offs, mask=inb, other=1) - 1).to(tl.int64)
    slot = tl.where(to_first, c * 2, c * 2 + 1)
    to_slot = to_first | to_last
    if pd == 0:
        tl.store(uniq_ptr + seg, key.to(tl.int64), mask=real & starts)

    p = tl.load(perm_ptr + offs, mask=inb, other=0)
    w = tl.load(w_ptr + p, mask=real, other=0.0)
    g_rows = g_ptr + (p // K)[:, None] * stride_g
    v_rows = values_ptr + key.to(tl.int64)[:, None] * stride_v
    flags = tl.broadcast_to(starts.to(tl.int32)[:, None], (CHUNK, D_STEP))
    gw = tl.zeros([CHUNK], dtype=tl.float32)
    for dd in tl.static_range(0, BLOCK_D, D_STEP):
        offs_d = pd * BLOCK_D + dd + tl.arange(0, D_STEP)
        dmask = offs_d < D
        m2 = real[:, None] & dmask[None, :]
        g = tl.load(g_rows + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(v_rows + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        gw += tl.sum(g * v, axis=1)
        run, _ = tl.associative_scan((g * w[:, None], flags), 0, _seg_sum)
        tl.store(rg_ptr + seg[:, None] * D + offs_d[None, :], run, mask=direct[:, None] & dmask[None, :])
        tl.store(bnd_ptr + slot[:, None] * D + offs_d[None, :], run, mask=to_slot[:, None] & dmask[None, :])
    # every pair's partial is written (0 for padding), so the buffer needs no zeroing
    tl.store(gw_ptr + pd.to(tl.int64) * TK + p, gw, mask=inb)


@triton.jit
def _carry_kernel(skey_ptr, csum_ptr, rg_ptr, bnd_ptr, TK, D, SENT,
                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, SPAN: tl.constexpr):
    """Chunk c owns the segment that starts in it and continues past it (its slot-1
    partial): adds the slot-0 partials of chunks c+1, c+2, ... (SPAN per step) while
    their first key is the segment's row, and writes the row grad. Sorted keys: the
    chunks whose first key is the row are consecutive, and each holds a slot-0 partial
    of it. The conditions are the ones _chunk_kernel wrote the slots under."""
    c = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    i0 = c * CHUNK
    last = tl.minimum(i0 + CHUNK, TK) - 1
    key = tl.load(skey_ptr + last)
    nxt = tl.load(skey_ptr + last + 1, mask=(last + 1) < TK, other=-1)
    before = tl.load(skey_ptr + i0 - 1, mask=i0 >= 1, other=-1)
    if (key != SENT) & (key == nxt) & (key != before):
        offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        acc = tl.load(bnd_ptr + (c * 2 + 1) * D + offs_d, mask=dmask, other=0.0)
        c2 = c + 1
        n_hit = tl.full((), SPAN, tl.int32)
        while n_hit == SPAN:  # all SPAN chunks were the row's: it may go on
            cs = c2 + tl.arange(0, SPAN)
            pos = cs * CHUNK
            hit = tl.load(skey_ptr + pos, mask=pos < TK, other=-1) == key
            part = tl.load(bnd_ptr + (cs * 2)[:, None] * D + offs_d[None, :],
                           mask=hit[:, None] & dmask[None, :], other=0.0)
            acc += tl.sum(part, axis=0)
            n_hit = tl.sum(hit.to(tl.int32), axis=0)
            c2 += SPAN
        seg = (tl.load(csum_ptr + last) - 1).to(tl.int64)
        tl.store(rg_ptr + seg * D + offs_d, acc, mask=dmask)


def readout_backward_chunked(values, ids, w, grad_out, config: ChunkedConfig | None = None, softmax=False):
    """-> (grad_w [T, K] fp32, w [T, K] fp32, unique-id buffer, row-grad buffer, csum), as
    triton_readout._readout_backward: _trim (the host sync) cuts the buffers to
    (unique ids [U] sorted, row grads [U, D] fp32).
    w: the weights, or (softmax=True) the scores, whose masked softmax is recomputed here."""
    cfg = config or ChunkedConfig()
    T, K = ids.shape
    D = values.shape[1]
    N = values.shape[0]
    dev = values.device
    TK = T * K
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    w = w.contiguous()
    ids = ids.contiguous()
    block_d = min(cfg.block_d, _next_pow2(D))
    n_dblk = max(triton.cdiv(D, block_d), 1)  # one block even at D = 0: it writes uniq
    if N < 2 ** 31 - 1:
        sentinel, key_dtype = 2 ** 31 - 1, torch.int32
    else:
        sentinel, key_dtype = 2 ** 63 - 1, torch.int64
    key = torch.empty(TK, dtype=key_dtype, device=dev)
    weights = torch.empty((T, K), dtype=torch.float32, device=dev) if softmax else w.float()
    if TK:
        _bwd_prep_kernel[(T,)](w, ids, weights, key, K, sentinel, K_PAD=_next_pow2(K), SOFTMAX=softmax,
                               num_warps=1)
    # stable: the pairs of a segment stay in pair order, so the summation order is fixed
    skey, perm = torch.sort(key, stable=True)
    flag = torch.empty(TK, dtype=torch.int32, device=dev)
    if TK:
        _start_flags_kernel[(triton.cdiv(TK, 1024),)](skey, flag, TK, sentinel, BLOCK=1024)
    csum = torch.cumsum(flag, 0, dtype=torch.int32)
    cap = min(TK, N)
    uniq = torch.empty(cap, dtype=torch.int64, device=dev)
    row_grads = torch.empty((cap, D), dtype=torch.float32, device=dev)
    n_chunks = triton.cdiv(TK, cfg.chunk)
    gw_part = torch.empty((n_dblk, TK), dtype=torch.float32, device=dev)
    if TK:
        boundary = torch.empty((2 * n_chunks, D), dtype=torch.float32, device=dev)  # slots 0 and 1 per chunk
        _chunk_kernel[(n_chunks, n_dblk)](values, g, weights, skey, perm, csum, uniq, row_grads, boundary,
                                          gw_part, TK, K, D, values.stride(0), g.stride(0), sentinel,
                                          CHUNK=cfg.chunk, BLOCK_D=block_d, D_STEP=min(cfg.d_step, block_d),
                                          num_warps=cfg.num_warps)
        if n_chunks > 1 and D:
            _carry_kernel[(n_chunks, n_dblk)](skey, csum, row_grads, boundary, TK, D, sentinel,
                                              CHUNK=cfg.chunk, BLOCK_D=block_d, SPAN=cfg.carry_span,
                                              num_warps=1)
    grad_w = gw_part[0] if n_dblk == 1 else gw_part.sum(0)
    return grad_w.reshape(T, K), weights, uniq, row_grads, csum
