"""Zarr arrays at disk speed: the chunk files of raw (uncompressed) arrays written and read
directly, many at a time, straight from and into the caller's buffers.

Zarr stores an uncompressed array's chunk as the C-order bytes of the chunk (edge chunks
padded to full size with the fill value). Our arrays are chunked by whole rows, so rows
[i*c, (i+1)*c) are one contiguous slice of the array's buffer and one file. Writing: zarr
writes the metadata (`zarr.json`), then a thread pool writes each slice with one write
call (the GIL is released during it). Reading: each chunk file is read with `readinto`
into its slice of the target buffer (a numpy array, a CPU tensor, or, for a GPU tensor,
a per-thread pinned staging buffer copied to the device), so a loaded table is never
held twice. Arrays that are not in that layout (compressed, sharded, older stores) are
read through zarr. The files are exactly zarr's: zarr reads them back (tests check it).

Measured on a 2-core box (benchmarks/STORE_NOTES.md, "Persistence"): zarr's own path
was 0.2-0.4 GB/s reading; the direct path runs at page-cache / disk speed.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr

CHUNK_BYTES = 16 << 20   # about 16 MiB a chunk file: large sequential writes, enough files to parallelise


@dataclass
class IOConfig:
    """Threads writing / reading chunk files (disk queues want several requests in flight;
    each thread holds one chunk in flight, and on the GPU path one pinned staging chunk)."""
    threads: int = int(os.environ.get("KSTORE_IO_THREADS", "16"))


IO = IOConfig()
_pool: ThreadPoolExecutor | None = None


_copy_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """Threads doing file I/O (writes, reads, fsyncs)."""
    global _pool
    if _pool is None or getattr(_pool, "_max_workers", 0) != IO.threads:
        _pool = ThreadPoolExecutor(max_workers=max(1, IO.threads), thread_name_prefix="chunk-io")
    return _pool


def copy_pool() -> ThreadPoolExecutor:
    """Threads copying tensors to the host for writing (apart from the I/O threads, so all
    copies end without waiting for the disk)."""
    global _copy_pool
    if _copy_pool is None or getattr(_copy_pool, "_max_workers", 0) != IO.threads:
        _copy_pool = ThreadPoolExecutor(max_workers=max(1, IO.threads), thread_name_prefix="chunk-copy")
    return _copy_pool


def chunk_rows(shape: tuple, itemsize: int) -> int:
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    return max(1, min(max(shape[0], 1), CHUNK_BYTES // row_bytes))


def _chunk_path(z: zarr.Array, i: int) -> str:
    key = z.metadata.chunk_key_encoding.encode_chunk_key((i,) + (0,) * (len(z.shape) - 1))
    return os.path.join(str(z.store_path.store.root), z.store_path.path, key)


def _is_raw(z: zarr.Array) -> bool:
    """Whether `z` is in the layout this module reads directly: zarr 3, one little-endian
    (or byte-sized) bytes codec, a regular grid of whole-row chunks, on a local store."""
    md = z.metadata
    try:
        codecs = md.codecs
        grid = md.chunk_grid.chunk_shape
        root = z.store_path.store.root
    except AttributeError:
        return False
    if root is None or len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
        return False
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    return endian in (None, "little") and tuple(grid[1:]) == tuple(z.shape[1:]) and md.fill_value == 0


def write_array(group: zarr.Group, name: str, arr) -> list:
    """Create array `name` in `group` holding `arr` (numpy, or a tensor on any device: bf16
    stored as uint16 bits); returns the futures of its chunk writes (wait for them, e.g.
    with `wait`). A tensor is copied to the host chunk by chunk (in parallel), each chunk's
    write starting as soon as it is copied: when this returns the tensor has been read
    (the caller may let its owner change it) and the disk is already busy."""
    if isinstance(arr, torch.Tensor):
        src = arr.detach()
        if src.dtype == torch.bfloat16:
            src = src.view(torch.int16)
            host = np.empty(tuple(src.shape), dtype=np.uint16)
        else:
            host = np.empty(tuple(src.shape), dtype=torch.empty(0, dtype=src.dtype).numpy().dtype)
        src = src.contiguous()
    else:
        src, host = None, np.ascontiguousarray(arr)
    rows = chunk_rows(host.shape, host.itemsize)
    z = group.create_array(name, shape=host.shape, dtype=host.dtype, chunks=(rows, *host.shape[1:]),
                           compressors=None, fill_value=0, config={"write_empty_chunks": True})
    if host.size == 0:
        return []
    flat = host.reshape(host.shape[0], -1).view(np.uint8)   # one row of bytes per array row
    chunk_bytes = rows * flat.shape[1]
    starts = range(0, host.shape[0], rows)
    if src is None:
        return [pool().submit(_write_chunk, _chunk_path(z, i), flat[lo:lo + rows], chunk_bytes)
                for i, lo in enumerate(starts)]
    # a tensor: chunks copied to the host in parallel (a fresh buffer's page faults and the
    # copies spread over cores), each chunk's write queued as soon as it is copied
    dst = torch.from_numpy(host.view(np.int16) if host.dtype == np.uint16 else host)
    copies = [copy_pool().submit(_copy_then_write, dst, src, lo, min(lo + rows, host.shape[0]),
                                 _chunk_path(z, i), flat[lo:lo + rows], chunk_bytes)
              for i, lo in enumerate(starts)]
    writes, first = [], None
    for c in copies:
        try:
            writes.append(c.result())
        except BaseException as e:  # noqa: BLE001 -- raised below, after every copy ended
            first = first or e
    if first is not None:
        _settle(writes)
        raise first
    return writes


def _copy_then_write(dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, path: str, part: np.ndarray,
                     chunk_bytes: int):
    dst[lo:hi].copy_(src[lo:hi])
    return pool().submit(_write_chunk, path, part, chunk_bytes)


def _settle(futures: list) -> None:
    for f in futures:
        try:
            f.result()
        except BaseException:  # noqa: BLE001 -- the caller raises its own error
            pass


def _write_chunk(path: str, part: np.ndarray, chunk_bytes: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(part).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        if len(view) < chunk_bytes:      # an edge chunk: zarr stores it full size, padded with the fill (0)
            os.ftruncate(fd, chunk_bytes)
    finally:
        os.close(fd)


def wait(futures: list) -> None:
    """Wait for every future; raise the first error after all have finished."""
    first = None
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            first = first or e
    if first is not None:
        raise first


def read_into(z: zarr.Array, out: torch.Tensor, *, staged: bool | None = None) -> None:
    """Read array `z` into `out` (a contiguous tensor of z's shape and item size, on any
    device), chunk files in parallel; through zarr where `z` is not raw. `staged`: through
    per-thread host buffers (default: where `out` is not in host memory; tests force it)."""
    if out.numel() == 0:
        return
    if not _is_raw(z):   # zarr's own pipeline, as many chunks in flight as our threads
        with zarr.config.set({"async.concurrency": max(10, IO.threads)}):
            data = torch.from_numpy(np.ascontiguousarray(z[...]))
        out.view(torch.uint8).copy_(data.view(torch.uint8).reshape(out.view(torch.uint8).shape))
        return
    rows = z.chunks[0]
    row_bytes = out.view(torch.uint8).reshape(out.shape[0], -1).shape[1]
    dst = out.view(torch.uint8).reshape(out.shape[0], row_bytes)
    gpu = out.device.type != "cpu"
    staged = gpu if staged is None else staged
    futures = [pool().submit(_read_chunk, _chunk_path(z, i), dst, lo, min(lo + rows, out.shape[0]), staged)
               for i, lo in enumerate(range(0, out.shape[0], rows))]
    wait(futures)
    if gpu:
        torch.cuda.synchronize(out.device)


_staging = None   # per-thread pinned staging buffers (GPU path)


def _read_chunk(path: str, dst: torch.Tensor, lo: int, hi: int, staged: bool) -> None:
    n = (hi - lo) * dst.shape[1]
    with open(path, "rb", buffering=0) as f:
        if not staged:
            _readinto(f, memoryview(dst[lo:hi].numpy()).cast("B"), path)
            return
        buf = _pinned(n)
        _readinto(f, memoryview(buf[:n].numpy()).cast("B"), path)
        dst[lo:hi].view(-1).copy_(buf[:n])   # synchronous: the buffer is reused by this thread next


def _readinto(f, view: memoryview, path: str) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise OSError(f"{path}: chunk file ends after {done} of {len(view)} bytes")
        done += got


def _pinned(n: int) -> torch.Tensor:
    import threading
    global _staging
    if _staging is None:
        _staging = threading.local()
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.numel() < n:   # page-locked where CUDA is there to copy from it
        buf = torch.empty(max(n, CHUNK_BYTES), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        _staging.buf = buf
    return buf


def torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    """The torch dtype holding `np_dtype`'s items bit for bit (uint16 as int16)."""
    if np_dtype == np.uint16:
        return torch.int16
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def read_tensor(z: zarr.Array, device: torch.device | str = "cpu") -> torch.Tensor:
    """Array `z` as a new tensor on `device` (uint16 items as int16 bits)."""
    out = torch.empty(tuple(z.shape), dtype=torch_dtype(np.dtype(z.dtype)), device=device)
    read_into(z, out)
    return out


def fsync_files(paths: list[str]) -> None:
    """fsync every file, in parallel (the disk flushes several at once)."""
    wait([pool().submit(_fsync, p) for p in paths])


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
