"""A fresh table's initial rows, drawn block by block straight into their destination.

Row r of stream s (0: values, 1: flat keys) is row r % BLOCK of
`randn(BLOCK, dim, generator=block_gen(seed, s, r // BLOCK)) * scale`: a row's initial
value depends on its global id only, never on how the table is sharded. Blocks are
drawn in parallel on a thread pool (torch releases the GIL inside randn) and each one is
converted to the destination dtype on the host and copied into its rows of the
preallocated destination (a GPU, or host memory, pinned or not) as soon as it is drawn:
the host never holds the table in fp32, nor a concatenated second copy; at most one fp32
block per thread is alive.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

BLOCK = 4096


def block_gen(seed: int, stream: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_003 + block)


def empty_rows(num_rows: int, dim: int, dtype: torch.dtype, device: torch.device | str,
               pin_memory: bool = False) -> torch.Tensor:
    """Uninitialised [num_rows, dim]; page-locked when it lives on the host, `pin_memory`
    asks and CUDA is there to use it."""
    dev = torch.device(device)
    pin = pin_memory and dev.type == "cpu" and torch.cuda.is_available()
    return torch.empty(num_rows, dim, dtype=dtype, device=dev, pin_memory=pin)


def default_workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


def draw_rows(seed: int, stream: int, dim: int, scale: float, ranges: Sequence[tuple[int, int]], *,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", pin_memory: bool = False,
              workers: int | None = None) -> torch.Tensor:
    """The initial rows of the global ids in `ranges` (ascending, disjoint [lo, hi)), in
    that order, as [sum(hi - lo), dim] `dtype` on `device`."""
    total = sum(hi - lo for lo, hi in ranges)
    out = empty_rows(total, dim, dtype, device, pin_memory)
    # block -> [(first row in block, end in block, destination offset)]; a block two
    # ranges share is drawn once
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    off = 0
    for lo, hi in ranges:
        for b in range(lo // BLOCK, -(-hi // BLOCK)):
            b0 = b * BLOCK
            a, e = max(lo, b0), min(hi, b0 + BLOCK)
            pieces.setdefault(b, []).append((a - b0, e - b0, off + a - lo))
        off += hi - lo

    def one(b: int) -> None:
        block = torch.randn(BLOCK, dim, generator=block_gen(seed, stream, b)).mul_(scale)
        for a, e, o in pieces[b]:
            # the dtype conversion runs on the host, as the whole-table path did
            out[o:o + e - a].copy_(block[a:e].to(dtype))

    blocks = sorted(pieces)
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(blocks) <= 1:
        for b in blocks:
            one(b)
    else:
        with ThreadPoolExecutor(min(workers, len(blocks)), "init-rows") as pool:
            for f in [pool.submit(one, b) for b in blocks]:
                f.result()
    return out
