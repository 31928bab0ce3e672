"""Zarr 3 versions of a table: the one place shard state meets the disk.

Layout (format 2):

    <store_root>/versions/v00000007/        one Zarr group per published version
        zarr.json                           root attrs: format (2), version, step, d_k, d_v, value_dtype,
                                            segments, shards (the shard map), config, optimizer
        shard_0000/                         one subgroup per shard
            per owned row:      values, frozen, ablated, hits, weight_sum, opt_steps[, opt_m, opt_v]
            per owned flat row: flat_ids, keys, flat_bias, key_steps[, key_m, key_v], flat_partition,
                                tag_<name> (one int64 array per tag name, -1 = unset)
            product segments whose codebooks the store holds:
                                pk<seg>_codebook_a, pk<seg>_codebook_b, pk<seg>_bias_a, pk<seg>_bias_b
            attrs: format, shard_id, row_start, row_end, step, version, d_k, d_v, value_dtype,
                   segments, config, value_storage ("bfloat16" values are stored as
                   uint16 bit patterns)
    <store_root>/staging/v00000007-<uuid>/  a version being written

A version is written in full under staging/ and published by one os.rename
into versions/, so a half-written version is never visible.

Format 1 (written before tags and partitions existed; its shard groups carry no
`format` attribute) kept per-row labels as int64 arrays `flat_<name>`: `read_shard`
reads those as tag <name>, every row in partition 0, and hands back format 2.
Nothing writes format 1.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr

from . import errors
from .config import TableConfig

FORMAT = 2
_VERSION_RE = re.compile(r"^v(\d{8})$")

# Arrays with one entry per owned row, and with one entry per owned flat row (besides the tags).
ROW_ARRAYS = ("values", "frozen", "ablated", "hits", "weight_sum", "opt_steps", "opt_m", "opt_v")
FLAT_ARRAYS = ("flat_ids", "keys", "flat_bias", "key_steps", "key_m", "key_v", "flat_partition")
_TAG_PREFIX = "tag_"
_FORMAT1_NOT_TAGS = ("flat_ids", "flat_bias", "flat_partition")


def version_name(version: int) -> str:
    return f"v{version:08d}"


VERSIONS_DIR, STAGING_DIR = "versions", "staging"


def version_path(store_root: str, version: int) -> str:
    return os.path.join(store_root, VERSIONS_DIR, version_name(version))


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


def tag_array_name(tag: str) -> str:
    return _TAG_PREFIX + tag


def tag_arrays(arrays: dict) -> dict[str, str]:
    """Tag name -> array name, for the tag arrays among `arrays` (format 2)."""
    return {name[len(_TAG_PREFIX):]: name for name in sorted(arrays) if name.startswith(_TAG_PREFIX)}


def flat_array_names(arrays: dict) -> list[str]:
    """The arrays among `arrays` with one entry per flat row, tags included."""
    return [n for n in FLAT_ARRAYS if n in arrays] + list(tag_arrays(arrays).values())


def _from_format1(data: ShardData) -> ShardData:
    """A format-1 shard as format 2: int64 arrays `flat_<name>` (other than flat_ids,
    flat_bias, flat_partition) become tag <name>; every row is in partition 0."""
    arrays = {}
    for name, arr in data.arrays.items():
        if name.startswith("flat_") and name not in _FORMAT1_NOT_TAGS and arr.dtype == np.int64:
            tag = name[len("flat_"):]
            if not re.match(r"^[a-z][a-z0-9_]{0,31}$", tag):
                raise errors.FailedPrecondition(f"format-1 array {name!r} does not name a valid tag")
            arrays[tag_array_name(tag)] = arr
        elif name != "flat_partition":
            arrays[name] = arr
    arrays["flat_partition"] = np.zeros(arrays["flat_ids"].shape[0], dtype=np.int64)
    return ShardData(dict(data.attrs, format=FORMAT), arrays)


# -- writing and reading -------------------------------------------------------

_CHUNK_BYTES = 16 << 20


def _array_options(arr: np.ndarray) -> dict:
    """Chunks of whole rows, about 16 MiB each. Float data (values, keys, optimizer
    state) is near incompressible and stored raw, which writes faster
    (benchmarks/STORE_NOTES.md); masks and counters keep Zarr's default compression."""
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, min(max(arr.shape[0], 1), _CHUNK_BYTES // row_bytes))
    opts = {"chunks": (rows, *arr.shape[1:])}
    if arr.dtype.kind == "f" or arr.dtype == np.uint16:
        opts["compressors"] = None
    return opts


def write_shard(version_dir: str, data: ShardData) -> None:
    """Write one shard's subgroup (format 2 only)."""
    stale = [n for n in data.arrays if n.startswith("flat_") and n not in FLAT_ARRAYS]
    if data.attrs.get("format") != FORMAT or stale:
        raise errors.FailedPrecondition(f"write_shard writes format {FORMAT} only (got format "
                                        f"{data.attrs.get('format')}, arrays {stale})")
    group = zarr.open_group(version_dir, mode="a").create_group(shard_group_name(data.attrs["shard_id"]))
    for name, arr in data.arrays.items():
        arr = np.ascontiguousarray(arr)
        group.create_array(name, data=arr, **_array_options(arr))
    group.attrs.update(data.attrs)


@contextlib.contextmanager
def _reading(path: str):
    """Anything but a missing file that goes wrong reading `path` is data loss, named so."""
    try:
        yield
    except (errors.StoreError, FileNotFoundError, KeyError):
        raise
    except Exception as e:
        raise errors.DataLoss(path, f"cannot be read ({type(e).__name__}: {str(e)[:120]})") from e


def _open_shard_group(version_dir: str, shard_id: int):
    name = shard_group_name(shard_id)
    with _reading(os.path.join(version_dir, "zarr.json")):
        root = zarr.open_group(version_dir, mode="r")
    try:
        with _reading(os.path.join(version_dir, name, "zarr.json")):
            return root[name]
    except (FileNotFoundError, KeyError) as e:
        raise errors.NotFound(f"shard {shard_id} not in {version_dir}") from e


def shard_format(version_dir: str, shard_id: int) -> int:
    """The format a shard's subgroup was written in (1 when it says none)."""
    try:
        group = _open_shard_group(version_dir, shard_id)
    except FileNotFoundError as e:
        raise errors.NotFound(f"shard {shard_id} not in {version_dir}") from e
    return int(group.attrs.get("format", 1))


def read_shard(version_dir: str, shard_id: int) -> ShardData:
    """One shard's subgroup, in format 2 whatever format it was written in."""
    fmt = shard_format(version_dir, shard_id)
    if fmt not in (1, FORMAT):
        raise errors.FailedPrecondition(f"shard {shard_id} of {version_dir} is in format {fmt}; this store "
                                        f"reads formats 1 and {FORMAT}")
    group = _open_shard_group(version_dir, shard_id)
    base = os.path.join(version_dir, shard_group_name(shard_id))
    with _reading(base):
        arrays = dict(group.arrays())
    data = ShardData(dict(group.attrs), {})
    for name, arr in arrays.items():
        with _reading(os.path.join(base, name)):   # a truncated or corrupt chunk names its array
            data.arrays[name] = arr[...]
    return _from_format1(data) if fmt == 1 else data


def write_root_attrs(version_dir: str, attrs: dict) -> None:
    zarr.open_group(version_dir, mode="a").attrs.update(attrs)


def read_root_attrs(store_root: str, version: int) -> dict:
    path = version_path(store_root, version)
    if not os.path.isdir(path):
        raise errors.NotFound(f"version {version} is not published under {store_root}")
    with _reading(os.path.join(path, "zarr.json")):
        return dict(zarr.open_group(path, mode="r").attrs)


def new_stage(store_root: str, version: int) -> str:
    """A fresh, empty Zarr group under staging/ for (a rewrite of) `version`."""
    os.makedirs(os.path.join(store_root, VERSIONS_DIR), exist_ok=True)
    clean_staging(store_root)
    # The owner (host, pid) is in the name, so a cleaner can tell a crashed writer's leftovers
    # from a live one's work: v00000007-h<host hash>-p<pid>-<random>.
    stage = os.path.join(store_root, STAGING_DIR, f"{version_name(version)}-h{_HOST}-p{os.getpid()}-"
                                                  f"{uuid.uuid4().hex[:8]}")
    os.makedirs(stage)
    zarr.open_group(stage, mode="w")
    return stage


@contextlib.contextmanager
def staged_version(store_root: str, version: int):
    """Yield a fresh staging dir for `version`; publish it with one rename if the
    block completes, delete it if the block raises. A version that already
    exists is never overwritten (errors.FailedPrecondition)."""
    if os.path.exists(version_path(store_root, version)):
        raise errors.FailedPrecondition(f"version {version} already exists under {store_root}")
    stage = new_stage(store_root, version)
    try:
        yield stage
        fsync_tree(stage)
        os.rename(stage, version_path(store_root, version))  # fails if the target exists
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_STAGE_RE = re.compile(r"^v\d{8}-h([0-9a-f]{8})-p(\d+)-[0-9a-f]{8}(-old)?$")
STAGING_LEASE_S = 6 * 3600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(store_root: str, lease_s: float = STAGING_LEASE_S) -> list[str]:
    """Delete what crashed writers left under staging/ (never visible as versions): a
    directory whose owner process, on this host, is gone, or, whatever its owner, one not
    touched for lease_s seconds (servers and publishers share a store root, so a live
    writer's staging is never removed). Runs when a publisher stages a version and when a
    server starts. Returns the names removed."""
    top = os.path.join(store_root, STAGING_DIR)
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return []
    removed, now = [], time.time()
    for name in names:
        path = os.path.join(top, name)
        m = _STAGE_RE.match(name)
        try:
            age = now - max([os.stat(path).st_mtime] + [e.stat().st_mtime for e in os.scandir(path)])
        except FileNotFoundError:
            continue   # its writer finished (published or removed it) meanwhile
        dead = m is not None and m.group(1) == _HOST and not _alive(int(m.group(2)))
        if dead or age > lease_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def table_root_attrs(version: int, step: int, shard_datas_attrs: list[dict]) -> dict:
    """Root attrs of a version from its shards' attrs (sorted by row_start)."""
    last = max(shard_datas_attrs, key=lambda a: a["row_end"])
    config = last["config"]
    return {
        "format": FORMAT,
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


def load_config(store_root: str, version: int) -> TableConfig:
    return TableConfig.from_dict(read_root_attrs(store_root, version)["config"])


__all__ = [
    "FORMAT", "ShardData", "list_versions", "latest_version", "version_path", "shard_group_name",
    "staged_version", "new_stage", "fsync_tree", "write_shard", "read_shard", "shard_format", "write_root_attrs",
    "read_root_attrs", "finish_version", "clean_staging", "load_config", "to_numpy", "from_numpy",
    "tag_array_name", "tag_arrays", "flat_array_names", "ROW_ARRAYS", "FLAT_ARRAYS",
]
