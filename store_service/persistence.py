"""Zarr 3 versions of a table: the one place shard state meets the disk.

Layout:

    <store_root>/versions/v00000007/        one Zarr group per published version
        zarr.json                           root attrs: version, step, d_k, d_v, value_dtype,
                                            segments, shards (the shard map), config, optimizer
        shard_0000/                         one subgroup per shard
            values, frozen, ablated, hits, weight_sum, opt_steps[, opt_m, opt_v],
            flat_ids, keys, flat_bias, key_steps[, key_m, key_v][, flat_cue, flat_gate],
            pk<seg>_codebook_a, pk<seg>_codebook_b, pk<seg>_bias_a, pk<seg>_bias_b
            attrs: shard_id, row_start, row_end, step, version, d_k, d_v, value_dtype,
                   segments, config, value_storage ("bfloat16" values are stored as
                   uint16 bit patterns)
    <store_root>/staging/v00000007-<uuid>/  a version being written

A version is written in full under staging/ and published by one os.rename
into versions/, so a half-written version is never visible.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr

from . import errors
from .config import TableConfig, partition_rows, segments_from_json

_VERSION_RE = re.compile(r"^v(\d{8})$")

# Arrays with one entry per owned row, and with one entry per owned flat row.
ROW_ARRAYS = ("values", "frozen", "ablated", "hits", "weight_sum", "opt_steps", "opt_m", "opt_v")
FLAT_ARRAYS = ("flat_ids", "keys", "flat_bias", "key_steps", "key_m", "key_v", "flat_cue", "flat_gate")


def version_name(version: int) -> str:
    return f"v{version:08d}"


def version_path(store_root: str, version: int) -> str:
    return os.path.join(store_root, "versions", version_name(version))


def shard_group_name(shard_id: int) -> str:
    return f"shard_{shard_id:04d}"


def list_versions(store_root: str) -> list[int]:
    d = os.path.join(store_root, "versions")
    if not os.path.isdir(d):
        return []
    return sorted(int(m.group(1)) for m in map(_VERSION_RE.match, os.listdir(d)) if m)


def latest_version(store_root: str) -> int | None:
    versions = list_versions(store_root)
    return versions[-1] if versions else None


# -- tensors <-> numpy ---------------------------------------------------------

def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str | None = None) -> torch.Tensor:
    """dtype "bfloat16" reinterprets uint16 bits."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


@dataclass
class ShardData:
    """Everything a shard persists: JSON attrs and named numpy arrays."""
    attrs: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# -- writing and reading -------------------------------------------------------

_CHUNK_BYTES = 16 << 20


def _array_options(arr: np.ndarray) -> dict:
    """Chunks of whole rows, about 16 MiB each. Float data (values, keys, optimizer
    state) is near incompressible and stored raw, which writes 2-4x faster; masks
    and counters keep Zarr's default compression."""
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, min(max(arr.shape[0], 1), _CHUNK_BYTES // row_bytes))
    opts = {"chunks": (rows, *arr.shape[1:])}
    if arr.dtype.kind == "f" or arr.dtype == np.uint16:
        opts["compressors"] = None
    return opts


def write_shard(version_dir: str, data: ShardData) -> None:
    group = zarr.open_group(version_dir, mode="a").create_group(shard_group_name(data.attrs["shard_id"]))
    for name, arr in data.arrays.items():
        arr = np.ascontiguousarray(arr)
        group.create_array(name, data=arr, **_array_options(arr))
    group.attrs.update(data.attrs)


def read_shard(version_dir: str, shard_id: int) -> ShardData:
    try:
        group = zarr.open_group(version_dir, mode="r")[shard_group_name(shard_id)]
    except (FileNotFoundError, KeyError) as e:
        raise errors.NotFound(f"shard {shard_id} not in {version_dir}") from e
    return ShardData(dict(group.attrs), {name: arr[...] for name, arr in group.arrays()})


def write_root_attrs(version_dir: str, attrs: dict) -> None:
    zarr.open_group(version_dir, mode="a").attrs.update(attrs)


def read_root_attrs(store_root: str, version: int) -> dict:
    path = version_path(store_root, version)
    if not os.path.isdir(path):
        raise errors.NotFound(f"version {version} is not published under {store_root}")
    return dict(zarr.open_group(path, mode="r").attrs)


@contextlib.contextmanager
def staged_version(store_root: str, version: int):
    """Yield a fresh staging dir for `version`; publish it with one rename if the
    block completes, delete it if the block raises. A version that already
    exists is never overwritten (errors.FailedPrecondition)."""
    if os.path.exists(version_path(store_root, version)):
        raise errors.FailedPrecondition(f"version {version} already exists under {store_root}")
    os.makedirs(os.path.join(store_root, "versions"), exist_ok=True)
    stage = os.path.join(store_root, "staging", f"{version_name(version)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(stage)
    zarr.open_group(stage, mode="w")
    try:
        yield stage
        _fsync_tree(stage)
        os.rename(stage, version_path(store_root, version))  # fails if the target exists
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def clean_staging(store_root: str) -> None:
    """Delete leftovers of writers that crashed (never visible as versions)."""
    shutil.rmtree(os.path.join(store_root, "staging"), ignore_errors=True)


def table_root_attrs(version: int, step: int, shard_datas_attrs: list[dict]) -> dict:
    """Root attrs of a version from its shards' attrs (sorted by row_start)."""
    last = max(shard_datas_attrs, key=lambda a: a["row_end"])
    config = last["config"]
    return {
        "format": 1,
        "version": version,
        "step": step,
        "d_k": last["d_k"],
        "d_v": last["d_v"],
        "value_dtype": last["value_dtype"],
        "segments": last["segments"],
        "shards": [{"shard_id": a["shard_id"], "row_start": a["row_start"], "row_end": a["row_end"]}
                   for a in sorted(shard_datas_attrs, key=lambda a: a["row_start"])],
        "config": config,
        "optimizer": config["optimizer"],
    }


def finish_version(version_dir: str, version: int) -> dict:
    """Write the root attrs of a staged version from the shard subgroups in it."""
    root = zarr.open_group(version_dir, mode="a")
    attrs = [dict(g.attrs) for _, g in root.groups()]
    if not attrs:
        raise errors.FailedPrecondition(f"no shard wrote into {version_dir}")
    step = min(a["step"] for a in attrs)
    out = table_root_attrs(version, step, attrs)
    root.attrs.update(out)
    return out


# -- repartition ---------------------------------------------------------------

def repartition(store_root: str, version: int, num_shards: int) -> int:
    """Re-split the rows of published `version` over `num_shards` shards and
    publish the result as a new version (returned). Every row's value, key,
    bias, optimizer state, masks and usage move bitwise. Per-shard sub-key
    biases of the second codebook (which each shard balances for its own rows)
    go to a new shard from the old shard that owned the new shard's first row.
    Loads the whole table into memory."""
    root = read_root_attrs(store_root, version)
    shard_ids = [s["shard_id"] for s in root["shards"]]
    olds = sorted((read_shard(version_path(store_root, version), s) for s in shard_ids),
                  key=lambda d: d.attrs["row_start"])
    segments = segments_from_json(root["segments"])
    whole = {name: np.concatenate([d.arrays[name] for d in olds])
             for name in ROW_ARRAYS + FLAT_ARRAYS if name in olds[0].arrays}
    # Product codebooks: identical copies; bias_a merged from each owner's rows.
    pk: dict[int, dict[str, np.ndarray]] = {}
    for si, seg in enumerate(segments):
        holders = [d for d in olds if f"pk{si}_codebook_a" in d.arrays]
        if not holders:
            continue
        merged = {n: holders[0].arrays[f"pk{si}_{n}"].copy() for n in ("codebook_a", "codebook_b", "bias_a")}
        for d in holders:
            lo, hi = _owned_subrows(seg, d.attrs["row_start"], d.attrs["row_end"])
            merged["bias_a"][lo:hi] = d.arrays[f"pk{si}_bias_a"][lo:hi]
        pk[si] = merged

    new_version = max(list_versions(store_root) + [version]) + 1
    ranges = partition_rows(segments, num_shards)
    with staged_version(store_root, new_version) as stage:
        for sid, (lo, hi) in enumerate(ranges):
            arrays = {n: whole[n][lo:hi] for n in ROW_ARRAYS if n in whole}
            fsel = (whole["flat_ids"] >= lo) & (whole["flat_ids"] < hi)
            arrays.update({n: whole[n][fsel] for n in FLAT_ARRAYS if n in whole})
            for si, merged in pk.items():
                seg = segments[si]
                if seg.row_end <= lo or seg.row_start >= hi:
                    continue
                first = max(lo, seg.row_start)
                donor = next(d for d in olds if d.attrs["row_start"] <= first < d.attrs["row_end"])
                arrays.update({f"pk{si}_{n}": merged[n] for n in ("codebook_a", "codebook_b", "bias_a")})
                arrays[f"pk{si}_bias_b"] = donor.arrays[f"pk{si}_bias_b"]
            attrs = dict(olds[0].attrs, shard_id=sid, row_start=lo, row_end=hi,
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
            shutil.copytree(os.path.join(src, shard_group_name(sid)), os.path.join(stage, shard_group_name(sid)))
            zarr.open_group(os.path.join(stage, shard_group_name(sid)), mode="a").attrs.update(
                {"version": new_version})
        finish_version(stage, new_version)
    return new_version


def _owned_subrows(seg, row_start: int, row_end: int) -> tuple[int, int]:
    """First-codebook rows [i0, i1) of product segment `seg` inside [row_start, row_end)."""
    lo = max(row_start, seg.row_start) - seg.row_start
    hi = min(row_end, seg.row_end) - seg.row_start
    if hi <= lo:
        return 0, 0
    return lo // seg.n_sub, -(-hi // seg.n_sub)


def load_config(store_root: str, version: int) -> TableConfig:
    return TableConfig.from_dict(read_root_attrs(store_root, version)["config"])


__all__ = [
    "ShardData", "list_versions", "latest_version", "version_path", "staged_version",
    "write_shard", "read_shard", "write_root_attrs", "read_root_attrs", "finish_version",
    "repartition", "compose_version", "clean_staging", "load_config", "to_numpy", "from_numpy",
]
