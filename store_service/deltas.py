"""Incremental versions: a shard's version as its parent plus the rows changed since.

A delta shard group (format 3) holds
    delta_rows      [D] int64   local rows that changed since the parent (sorted)
    delta_flat_pos  [Df] int64  the flat positions of those among them that are flat rows
    <row array>     [D, ...]    the changed rows of every per-row array (values, masks, usage,
                                optimizer state)
    <flat array>    [Df, ...]   the changed flat rows of every per-flat-row array (ids, keys,
                                bias, partition, tags, key optimizer state)
    <full array>    the whole array: small per-shard arrays (codebooks, sub-key biases) and
                    arrays a writer changed wholesale (balancing moves every flat bias)
and attrs naming each array's role, the parent version, the chain length and the shard's
row and flat-row counts (rows appended since the parent are changed rows). Rows are the
unit, not chunks: 1% of random rows touches every chunk.

Reading applies the deltas of a chain, oldest first, to its full base: the result is
bitwise the full version. This module is pure tensor work; `persistence` does the disk.
"""
from __future__ import annotations

import torch

DELTA_FORMAT = 3
MAX_CHAIN = 8             # a shard's chain is written in full again after this many deltas
MAX_DIRTY_FRACTION = 0.5  # above this share of changed rows a delta is no cheaper than the version

ROW_ARRAYS = ("values", "frozen", "ablated", "hits", "weight_sum", "opt_steps", "opt_m", "opt_v")
FLAT_ARRAYS = ("flat_ids", "keys", "flat_bias", "key_steps", "key_m", "key_v", "flat_partition")
TAG_PREFIX = "tag_"
TAG_UNSET = -1


def role(name: str, shape: tuple, num_rows: int, num_flat: int) -> str:
    """"row", "flat" or "full": how a delta holds array `name` of `shape`. Optimizer state
    arrays are named opt_* (per row) and key_* (per flat row)."""
    lead = shape[0] if shape else -1
    if (name in ROW_ARRAYS or name.startswith("opt_")) and lead == num_rows:
        return "row"
    if (name in FLAT_ARRAYS or name.startswith(("key_", TAG_PREFIX))) and lead == num_flat:
        return "flat"
    return "full"


def dtype_name(x) -> str:
    """The numpy name of the dtype an array (numpy, or a tensor) is stored as (bf16 as uint16)."""
    if isinstance(x, torch.Tensor):
        return "uint16" if x.dtype == torch.bfloat16 else str(torch.empty(0, dtype=x.dtype).numpy().dtype)
    return str(x.dtype)


def layout(arrays: dict) -> dict[str, list]:
    """name -> [stored dtype, trailing shape]: what a delta's parent must match array by array."""
    return {n: [dtype_name(t), list(t.shape[1:])] for n, t in sorted(arrays.items())
            if n not in ("delta_rows", "delta_flat_pos")}


def compatible(parent_layout: dict, tensors: dict) -> bool:
    """Whether a delta over a parent of `parent_layout` can describe `tensors`: the same
    arrays with the same dtypes and trailing shapes (a tag new since the parent is -1 there)."""
    mine = layout(tensors)
    for name, spec in mine.items():
        if parent_layout.get(name, spec if name.startswith(TAG_PREFIX) else None) != spec:
            return False
    return set(parent_layout) <= set(mine)


def make(tensors: dict[str, torch.Tensor], dirty: torch.Tensor, dense: set[str], flat_pos: torch.Tensor
         ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The delta of a shard whose arrays are `tensors`, changed since its parent at the rows
    where `dirty` [R] is set and wholesale in the arrays named in `dense`; flat_pos [R] maps
    a local row to its flat position (-1 for product rows). -> (role attrs, arrays)."""
    num_rows, num_flat = int(dirty.numel()), int(tensors["flat_ids"].shape[0])
    rows = torch.nonzero(dirty.to(flat_pos.device)).flatten()
    pos = flat_pos[rows]
    pos = pos[pos >= 0]
    out = {"delta_rows": rows, "delta_flat_pos": pos}
    roles: dict[str, list[str]] = {"row": [], "flat": [], "full": []}
    for name, t in sorted(tensors.items()):
        r = role(name, tuple(t.shape), num_rows, num_flat)
        if name in dense:
            r = "full"
        roles[r].append(name)
        out[name] = t if r == "full" else t.index_select(0, rows if r == "row" else pos)
    attrs = {"delta_row_arrays": roles["row"], "delta_flat_arrays": roles["flat"],
             "delta_full_arrays": roles["full"], "num_rows": num_rows, "num_flat": num_flat}
    return attrs, out


def apply(base: dict[str, torch.Tensor], attrs: dict, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The arrays of the version `delta` (with role `attrs`) describes over `base` (its
    parent's arrays, all on one device; modified in place where no row was appended)."""
    num_rows, num_flat = int(attrs["num_rows"]), int(attrs["num_flat"])
    rows = delta["delta_rows"].to(torch.int64)
    pos = delta["delta_flat_pos"].to(torch.int64)
    out = {}
    for name in attrs["delta_full_arrays"]:
        out[name] = delta[name]
    for names, idx, n in ((attrs["delta_row_arrays"], rows, num_rows), (attrs["delta_flat_arrays"], pos, num_flat)):
        for name in names:
            part = delta[name]
            held = base.get(name)
            if held is None:   # a tag new since the parent: unset on the parent's rows
                held = torch.full((0,) + tuple(part.shape[1:]), TAG_UNSET, dtype=part.dtype, device=part.device)
            if held.shape[0] < n:   # rows appended since the parent (every one of them is in the delta)
                grown = torch.full((n,) + tuple(held.shape[1:]), TAG_UNSET if name.startswith(TAG_PREFIX) else 0,
                                   dtype=held.dtype, device=held.device)
                grown[:held.shape[0]] = held
                held = grown
            elif held.shape[0] > n:
                raise ValueError(f"delta array {name}: parent has {held.shape[0]} rows, the delta's version {n}")
            if idx.numel():
                held.index_copy_(0, idx.to(held.device), part.to(held.device))
            out[name] = held
    return out
