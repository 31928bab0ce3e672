"""Operations on whole published versions: re-split over more or fewer shards, compose
one from the shards of others, move rows to new ids, rewrite one in place, compact a chain of
delta versions (`deltas`) into a full one.

Each reads a version through `persistence` (any format it reads) and writes a new
one (format 2) the way a snapshot is written: staged, synced, then published by a
rename, so no half-written version is ever visible.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from typing import Callable

import numpy as np
import torch
import zarr

from . import errors, persistence
from .config import partition_rows, segments_from_json
from .interface import SEGMENT_PRODUCT
from .optimizer import FLAT_STATE_ARRAYS, ROW_STATE_ARRAYS
from .persistence import (FLAT_ARRAYS, FORMAT, ROW_ARRAYS, ShardData, finish_version, flat_array_names,
                          fsync_tree, list_versions, new_stage, read_root_attrs, read_shard, shard_format,
                          shard_group_name, staged_version, tag_arrays, version_path, write_shard)


# the row optimizers' state (optimizer.py) moves with its rows like the persistence lists
_ROWS = tuple(dict.fromkeys(ROW_ARRAYS + ROW_STATE_ARRAYS))


def _flat_names(arrays: dict) -> list[str]:
    return list(dict.fromkeys(flat_array_names(arrays) + [n for n in FLAT_STATE_ARRAYS if n in arrays]))


def _read_all(store_root: str, version: int) -> tuple[dict, list[ShardData]]:
    """Root attrs and every shard's data (sorted by row_start) of a published version."""
    root = read_root_attrs(store_root, version)
    vdir = version_path(store_root, version)
    shards = sorted((read_shard(vdir, s["shard_id"]) for s in root["shards"]), key=lambda d: d.attrs["row_start"])
    return root, shards


def _whole_table(shards: list[ShardData]) -> dict[str, np.ndarray]:
    """Every per-row and per-flat-row array of the table, in id order; a tag some shard
    does not hold is unset (-1) on its rows."""
    whole = {n: np.concatenate([d.arrays[n] for d in shards]) for n in _ROWS + FLAT_ARRAYS + FLAT_STATE_ARRAYS
             if n in shards[0].arrays}
    for name in sorted({n for d in shards for n in tag_arrays(d.arrays).values()}):
        whole[name] = np.concatenate([d.arrays.get(name, np.full(d.arrays["flat_ids"].shape[0], -1, np.int64))
                                      for d in shards])
    return whole


def _rows_of(whole: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    """The arrays of the rows [lo, hi) (flat arrays: of the flat rows among them)."""
    out = {n: whole[n][lo:hi] for n in _ROWS if n in whole}
    fsel = (whole["flat_ids"] >= lo) & (whole["flat_ids"] < hi)
    out.update({n: whole[n][fsel] for n in _flat_names(whole)})
    return out


def _merged_codebooks(shards: list[ShardData], segments) -> dict[int, dict[str, np.ndarray]]:
    """Per product segment whose codebooks the store holds: the codebooks (identical copies
    on every shard) and the first codebook's sub-key biases, each entry from the shard that
    owns its rows."""
    pk: dict[int, dict[str, np.ndarray]] = {}
    for si, seg in enumerate(segments):
        holders = [d for d in shards if f"pk{si}_codebook_a" in d.arrays]
        if not holders:
            continue
        merged = {n: holders[0].arrays[f"pk{si}_{n}"].copy() for n in ("codebook_a", "codebook_b", "bias_a")}
        for d in holders:
            lo, hi = _owned_subrows(seg, d.attrs["row_start"], d.attrs["row_end"])
            merged["bias_a"][lo:hi] = d.arrays[f"pk{si}_bias_a"][lo:hi]
        pk[si] = merged
    return pk


def repartition(store_root: str, version: int, num_shards: int) -> int:
    """Re-split the rows of published `version` over `num_shards` shards and
    publish the result as a new version (returned). Every row's value, key,
    bias, tags, partition, optimizer state, masks and usage move bitwise. Per-shard
    sub-key biases of the second codebook (which each shard balances for its own rows)
    go to a new shard from the old shard that owned the new shard's first row.
    Loads the whole table into memory."""
    root, olds = _read_all(store_root, version)
    segments = segments_from_json(root["segments"])
    whole = _whole_table(olds)
    pk = _merged_codebooks(olds, segments)
    new_version = max(list_versions(store_root) + [version]) + 1
    ranges = partition_rows(segments, num_shards)
    with staged_version(store_root, new_version) as stage:
        for sid, (lo, hi) in enumerate(ranges):
            arrays = _rows_of(whole, lo, hi)
            for si, merged in pk.items():
                seg = segments[si]
                if seg.row_end <= lo or seg.row_start >= hi:
                    continue
                first = max(lo, seg.row_start)
                donor = next(d for d in olds if d.attrs["row_start"] <= first < d.attrs["row_end"])
                arrays.update({f"pk{si}_{n}": merged[n] for n in ("codebook_a", "codebook_b", "bias_a")})
                arrays[f"pk{si}_bias_b"] = donor.arrays[f"pk{si}_bias_b"]
            # the root's segments: those of the shard with the table's last rows (the others'
            # may predate rows appended since)
            attrs = dict(olds[0].attrs, shard_id=sid, row_start=lo, row_end=hi, segments=root["segments"],
                         step=root["step"], version=new_version)
            attrs["config"] = dict(attrs["config"], num_shards=num_shards)
            write_shard(stage, ShardData(attrs, arrays))
        finish_version(stage, new_version)
    return new_version


def compose_version(store_root: str, base_version: int, overrides: dict[int, int]) -> int:
    """Publish a new version whose shards come from `base_version`, except shard
    s, which comes from version overrides[s] (e.g. to roll one shard back).
    The layouts must agree: same shard ids, row ranges, dims and segments.
    Returns the new version."""
    base = read_root_attrs(store_root, base_version)
    ids = [s["shard_id"] for s in base["shards"]]
    for sid, v in overrides.items():
        if sid not in ids:
            raise errors.InvalidArgument("overrides", f"shard {sid} is not in version {base_version}")
        other = read_root_attrs(store_root, v)
        mine = next(s for s in base["shards"] if s["shard_id"] == sid)
        theirs = next((s for s in other["shards"] if s["shard_id"] == sid), None)
        same = theirs == mine and all(other[k] == base[k] for k in ("d_k", "d_v", "value_dtype", "segments"))
        if not same:
            raise errors.InvalidArgument("overrides", f"shard {sid} of version {v} does not have the layout "
                                                      f"of version {base_version}")
    new_version = max(list_versions(store_root)) + 1
    with staged_version(store_root, new_version) as stage:
        for sid in ids:
            src = version_path(store_root, overrides.get(sid, base_version))
            if shard_format(src, sid) == FORMAT:   # copied as it is
                shutil.copytree(os.path.join(src, shard_group_name(sid)), os.path.join(stage, shard_group_name(sid)))
                zarr.open_group(os.path.join(stage, shard_group_name(sid)), mode="a").attrs.update(
                    {"version": new_version})
            else:                                  # an older format: rewritten in this one
                data = read_shard(src, sid)
                write_shard(stage, ShardData(dict(data.attrs, version=new_version), data.arrays))
        finish_version(stage, new_version)
    return new_version


def publish_permuted(store_root: str, version: int, new_of_old: torch.Tensor,
                     codebook_perms: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> int:
    """Publish a new version of published `version` with every row moved to a new id, same
    shard layout; returns the new version. Each row's value, key, bias, tags, partition,
    optimizer state, masks and usage move with it bitwise.

    new_of_old [N] int64: the new id of every row, a permutation mapping each segment onto
    itself. Product row ids are tied to the codebooks (id = start + i*n + j), so product rows
    move only as their codebooks are permuted: codebook_perms maps a product segment's index
    to (perm_a [n], perm_b [n]), new sub-key -> old sub-key, and new_of_old must then move
    row (i, j) to (perm_a^-1[i], perm_b^-1[j]); a product segment without perms keeps its rows
    in place. Where the store holds a segment's codebooks and sub-key biases, they are
    permuted alike (a caller holding them permutes its own copies the same way). The
    second codebook's biases, balanced per shard, stay each shard's own, permuted."""
    root, olds = _read_all(store_root, version)
    segments = segments_from_json(root["segments"])
    num_rows = segments[-1].row_end
    new_of_old = _permutation("new_of_old", new_of_old, num_rows)
    perms = {si: (_permutation(f"codebook_perms[{si}][0]", a, _sub_keys(segments, si)),
                  _permutation(f"codebook_perms[{si}][1]", b, _sub_keys(segments, si)))
             for si, (a, b) in (codebook_perms or {}).items()}
    _check_moves(segments, new_of_old, perms)
    whole = _whole_table(olds)
    old_of_new = np.argsort(new_of_old)
    moved = {n: whole[n][old_of_new] for n in _ROWS if n in whole}
    flat_new_ids = new_of_old[whole["flat_ids"]]
    order = np.argsort(flat_new_ids, kind="stable")
    moved.update({n: whole[n][order] for n in _flat_names(whole)})
    moved["flat_ids"] = flat_new_ids[order].astype(whole["flat_ids"].dtype)
    pk = _merged_codebooks(olds, segments)
    for si, (pa, pb) in perms.items():
        if si in pk:
            pk[si] = {"codebook_a": pk[si]["codebook_a"][pa], "codebook_b": pk[si]["codebook_b"][pb],
                      "bias_a": pk[si]["bias_a"][pa]}
    new_version = max(list_versions(store_root) + [version]) + 1
    with staged_version(store_root, new_version) as stage:
        for d in olds:
            arrays = _rows_of(moved, d.attrs["row_start"], d.attrs["row_end"])
            for si, merged in pk.items():
                if f"pk{si}_codebook_a" not in d.arrays:
                    continue
                arrays.update({f"pk{si}_{n}": merged[n] for n in ("codebook_a", "codebook_b", "bias_a")})
                bias_b = d.arrays[f"pk{si}_bias_b"]
                arrays[f"pk{si}_bias_b"] = bias_b[perms[si][1]] if si in perms else bias_b
            write_shard(stage, ShardData(dict(d.attrs, version=new_version), arrays))
        finish_version(stage, new_version)
    return new_version


def _sub_keys(segments, si: int) -> int:
    if not 0 <= si < len(segments) or segments[si].kind != SEGMENT_PRODUCT:
        raise errors.InvalidArgument("codebook_perms", f"segment {si} is not a product segment")
    return segments[si].n_sub


def _permutation(field: str, perm, n: int) -> np.ndarray:
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (n,):
        raise errors.InvalidArgument(field, f"expected an int64 tensor [{n}], got "
                                            f"{getattr(perm, 'dtype', type(perm).__name__)} {list(getattr(perm, 'shape', []))}")
    out = perm.cpu().numpy()
    if not np.array_equal(np.sort(out), np.arange(n)):
        raise errors.InvalidArgument(field, f"is not a permutation of [0, {n})")
    return out


def _check_moves(segments, new_of_old: np.ndarray, perms: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every segment maps onto itself; product rows move as their codebooks do."""
    for si, seg in enumerate(segments):
        old = np.arange(seg.row_start, seg.row_end)
        new = new_of_old[old]
        if seg.kind == SEGMENT_PRODUCT:
            pa, pb = perms.get(si, (np.arange(seg.n_sub), np.arange(seg.n_sub)))
            i, j = (old - seg.row_start) // seg.n_sub, (old - seg.row_start) % seg.n_sub
            want = seg.row_start + np.argsort(pa)[i] * seg.n_sub + np.argsort(pb)[j]
            if not np.array_equal(new, want):
                bad = int(old[np.argmax(new != want)])
                raise errors.InvalidArgument("new_of_old", f"product row {bad} of segment {si} moves to "
                                                           f"{int(new_of_old[bad])}, not where its codebooks' "
                                                           f"permutation puts it ({int(want[bad - seg.row_start])})")
        elif new.size and (new.min() < seg.row_start or new.max() >= seg.row_end):
            raise errors.InvalidArgument("new_of_old", f"rows of segment {si} must stay in "
                                                       f"[{seg.row_start}, {seg.row_end})")


def compact(store_root: str, version: int) -> None:
    """Rewrite published `version` in place as a full version: each shard's delta chain
    (`deltas`) merged into one full subgroup, bitwise the same rows, the same content ids
    (so deltas over this version, and states based on it, stay valid), published by the
    atomic exchange of `rewrite_version`. Its parents may be deleted afterwards."""
    rewrite_version(store_root, version, lambda d: d, same_content=True)


def rewrite_version(store_root: str, version: int, edit: Callable[[ShardData], ShardData], *,
                    same_content: bool = False) -> None:
    """Rewrite published `version` in place: every shard's data (in format 2, whatever format
    it was written in) through `edit`, the whole version written under staging/, synced to
    disk, then put in the old one's place by one atomic exchange of the two directories where
    the OS has one (Linux renameat2), else by two renames. For versions no shard is loading
    meanwhile (a migration). `same_content`: `edit` keeps every row bitwise (compaction), so
    the shards keep their content ids; otherwise they get new ones."""
    _, shards = _read_all(store_root, version)
    path = version_path(store_root, version)
    stage = new_stage(store_root, version)
    try:
        for d in shards:
            write_shard(stage, edit(d), keep_content_id=same_content)
        finish_version(stage, version)
        fsync_tree(stage)
        if not _exchange(stage, path):
            aside = stage + "-old"
            os.rename(path, aside)
            os.rename(stage, path)
            stage = aside
        persistence.fsync_dir(os.path.dirname(path))   # the exchange itself, durable
    finally:
        shutil.rmtree(stage, ignore_errors=True)   # the old version, or a failed new one



def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the OS
    or file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _owned_subrows(seg, row_start: int, row_end: int) -> tuple[int, int]:
    """First-codebook rows [i0, i1) of product segment `seg` inside [row_start, row_end)."""
    lo = max(row_start, seg.row_start) - seg.row_start
    hi = min(row_end, seg.row_end) - seg.row_start
    if hi <= lo:
        return 0, 0
    return lo // seg.n_sub, -(-hi // seg.n_sub)
