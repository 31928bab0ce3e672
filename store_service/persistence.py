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

A version is written under staging/, its files synced to disk, and published by one
os.rename into versions/, so a half-written version is never visible.

Format 3 (`deltas`): a shard subgroup holding only the rows changed since its parent
version (attr `delta_parent`), read as a whole by resolving the chain down to a full
(format 1 or 2) subgroup. Every subgroup written now also carries `content_id` (a
random id of its content, kept by compaction, which does not change it) and `layout`
(each array's stored dtype and trailing shape), which a later delta checks its parent by.

Arrays are raw (uncompressed), chunked by whole rows, and written and read chunk file by
chunk file in parallel (`chunk_io`); arrays of older stores are read through zarr.

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

from . import chunk_io, deltas, errors
from .config import TableConfig
from .deltas import DELTA_FORMAT, FLAT_ARRAYS, ROW_ARRAYS

FORMAT = 2
_VERSION_RE = re.compile(r"^v(\d{8})$")

# ROW_ARRAYS, FLAT_ARRAYS (from deltas): arrays with one entry per owned row, and with one
# entry per owned flat row (besides the tags).
_TAG_PREFIX = deltas.TAG_PREFIX
_DELTA_ATTRS = ("delta_parent", "chain", "delta_row_arrays", "delta_flat_arrays", "delta_full_arrays",
                "num_rows", "num_flat")
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

class ShardWrite:
    """A shard subgroup being written (`start_shard`): `finish` waits for its chunk files
    and then writes its attrs."""

    def __init__(self, group, attrs: dict, futures: list):
        self._group, self._attrs, self._futures = group, attrs, futures

    def finish(self) -> None:
        chunk_io.wait(self._futures)
        self._group.attrs.update(self._attrs)


def start_shard(version_dir: str, data: ShardData, *, keep_content_id: bool = False) -> ShardWrite:
    """Start writing one shard's subgroup: a full one (format 2) or a delta (format 3,
    `deltas`). Arrays may be numpy or tensors (on any device); a tensor has been copied
    to the host when this returns (call it under the lock of the state it comes from; the
    chunk writes run on in the background). `staged_version` syncs the files before
    publishing. The subgroup gets a new content id unless `keep_content_id` (its content
    is bitwise that of the one whose id it carries: a snapshot naming its own, a compaction)."""
    stale = [n for n in data.arrays if n.startswith("flat_") and n not in FLAT_ARRAYS]
    if data.attrs.get("format") not in (FORMAT, DELTA_FORMAT) or stale:
        raise errors.FailedPrecondition(f"write_shard writes format {FORMAT} only (and format-{DELTA_FORMAT} "
                                        f"deltas; got format {data.attrs.get('format')}, arrays {stale})")
    group = zarr.open_group(version_dir, mode="a").create_group(shard_group_name(data.attrs["shard_id"]))
    futures = []
    try:
        for name, arr in data.arrays.items():
            futures += chunk_io.write_array(group, name, arr)
    except BaseException:
        chunk_io._settle(futures)
        raise
    attrs = dict(data.attrs)
    if not (keep_content_id and attrs.get("content_id")):
        attrs["content_id"] = uuid.uuid4().hex
    if attrs["format"] == FORMAT:
        attrs = {k: v for k, v in attrs.items() if k not in _DELTA_ATTRS}
        attrs["layout"] = deltas.layout(data.arrays)
    return ShardWrite(group, attrs, futures)


def write_shard(version_dir: str, data: ShardData, *, keep_content_id: bool = False) -> None:
    """Write one shard's subgroup (`start_shard`, then wait for it)."""
    start_shard(version_dir, data, keep_content_id=keep_content_id).finish()


def store_root_of(version_dir: str) -> str:
    """The store a version dir (published, versions/vN, or staged, staging/vN-x) belongs to."""
    return os.path.dirname(os.path.dirname(os.path.normpath(version_dir)))


@contextlib.contextmanager
def _reading(path: str):
    """Anything but a missing file that goes wrong reading `path` is data loss, named so."""
    try:
        yield
    except (errors.StoreError, FileNotFoundError, KeyError):
        raise
    except Exception as e:
        raise errors.DataLoss(path, f"cannot be read ({type(e).__name__}: {str(e)[:120]})") from e


def _group(version_dir: str, shard_id: int):
    name = shard_group_name(shard_id)
    try:
        with _reading(os.path.join(version_dir, "zarr.json")):
            root = zarr.open_group(version_dir, mode="r")
    except FileNotFoundError as e:
        raise errors.NotFound(f"version dir {version_dir} not found") from e
    try:
        with _reading(os.path.join(version_dir, name, "zarr.json")):
            return root[name]
    except (FileNotFoundError, KeyError) as e:
        raise errors.NotFound(f"shard {shard_id} not in {version_dir}") from e


def shard_format(version_dir: str, shard_id: int) -> int:
    """The format a shard's subgroup was written in (1 when it says none)."""
    try:
        group = _group(version_dir, shard_id)
    except FileNotFoundError as e:
        raise errors.NotFound(f"shard {shard_id} not in {version_dir}") from e
    return int(group.attrs.get("format", 1))


def shard_attrs(version_dir: str, shard_id: int) -> dict | None:
    """A shard subgroup's attrs (None where the version or the shard is not there)."""
    try:
        return dict(_group(version_dir, shard_id).attrs)
    except errors.NotFound:
        return None


def _chain(version_dir: str, shard_id: int) -> list:
    """The subgroups a shard's version is read from: itself, then its parents down to a full one."""
    chain, d = [], version_dir
    while True:
        group = _group(d, shard_id)
        fmt = int(group.attrs.get("format", 1))
        if fmt not in (1, FORMAT, DELTA_FORMAT):
            raise errors.FailedPrecondition(f"shard {shard_id} of {d} is in format {fmt}; this store reads "
                                            f"formats 1, {FORMAT} and {DELTA_FORMAT}")
        chain.append((fmt, group, os.path.join(d, shard_group_name(shard_id))))
        if fmt != DELTA_FORMAT:
            return chain
        if len(chain) > 1000:
            raise errors.FailedPrecondition(f"shard {shard_id} of {version_dir}: parent chain does not end")
        d = version_path(store_root_of(d), int(group.attrs["delta_parent"]))
        if not os.path.isdir(d):
            raise errors.FailedPrecondition(f"shard {shard_id} of {version_dir} is a delta over {d}, "
                                            "which is not published (compact a version before deleting its parent)")


def _stored_dtypes(group) -> dict[str, np.dtype]:
    return {name: np.dtype(arr.dtype) for name, arr in group.arrays()}


def _read_arrays(group, path: str, read) -> dict:
    """read(arr) of every array of a subgroup at `path`; a truncated or corrupt chunk is
    DATA_LOSS naming its array's directory."""
    with _reading(path):
        arrays = dict(group.arrays())
    out = {}
    for name, arr in arrays.items():
        with _reading(os.path.join(path, name)):
            out[name] = read(arr)
    return out


def read_shard_tensors(version_dir: str, shard_id: int, device: str | torch.device = "cpu"
                       ) -> tuple[dict, dict[str, torch.Tensor], dict[str, np.dtype]]:
    """One shard's version as tensors on `device`, read in parallel straight into them
    (uint16 arrays as int16 bits), whatever format it was written in, a delta chain
    resolved. -> (attrs in format 2, tensors, each array's stored numpy dtype)."""
    chain = _chain(version_dir, shard_id)
    fmt, base, base_path = chain[-1]
    if fmt == 1:
        data = _from_format1(ShardData(dict(base.attrs), _read_arrays(base, base_path, lambda a: a[...])))
        dtypes = {n: a.dtype for n, a in data.arrays.items()}
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a).view(np.int16) if a.dtype == np.uint16 else
                                       np.ascontiguousarray(a)).to(device) for n, a in data.arrays.items()}
    else:
        dtypes = _stored_dtypes(base)
        tensors = _read_arrays(base, base_path, lambda a: chunk_io.read_tensor(a, device))
    for _, group, path in reversed(chain[:-1]):
        attrs = dict(group.attrs)
        part = _read_arrays(group, path, lambda a: chunk_io.read_tensor(a, device))
        tensors = deltas.apply(tensors, attrs, part)
        dtypes.update(_stored_dtypes(group))
    top = dict(chain[0][1].attrs)
    attrs = {k: v for k, v in top.items() if k not in _DELTA_ATTRS and k != "layout"}
    attrs["format"] = FORMAT
    return attrs, tensors, {n: dtypes[n] for n in tensors}


def read_shard(version_dir: str, shard_id: int) -> ShardData:
    """One shard's subgroup as numpy arrays, in format 2 whatever format it was written in."""
    attrs, tensors, dtypes = read_shard_tensors(version_dir, shard_id, "cpu")
    return ShardData(attrs, {n: t.numpy().view(dtypes[n]) for n, t in tensors.items()})


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
        fsync_dir(os.path.join(store_root, "versions"))     # the rename itself, durable
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path`, in parallel."""
    files, dirs = [], []
    for dirpath, _, names in os.walk(path):
        dirs.append(dirpath)
        files += [os.path.join(dirpath, f) for f in names]
    chunk_io.fsync_files(files + dirs)   # all before the publishing rename, so in any order


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
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
    parents = sorted({int(a["delta_parent"]) for a in attrs if a.get("format") == DELTA_FORMAT})
    out.update(format=DELTA_FORMAT if parents else FORMAT, delta_parents=parents)
    root.attrs.update(out)
    return out


def load_config(store_root: str, version: int) -> TableConfig:
    return TableConfig.from_dict(read_root_attrs(store_root, version)["config"])


__all__ = [
    "FORMAT", "DELTA_FORMAT", "ShardData", "read_shard_tensors", "shard_attrs", "store_root_of", "list_versions", "latest_version", "version_path", "shard_group_name",
    "staged_version", "new_stage", "fsync_tree", "write_shard", "start_shard", "ShardWrite", "read_shard", "shard_format", "write_root_attrs",
    "read_root_attrs", "finish_version", "clean_staging", "load_config", "to_numpy", "from_numpy",
    "tag_array_name", "tag_arrays", "flat_array_names", "ROW_ARRAYS", "FLAT_ARRAYS",
]
