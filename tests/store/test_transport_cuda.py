"""The CUDA IPC path against the gRPC path, on a GPU (skipped without one).

A shard server process keeps its rows on the GPU (`--device cuda`); the client maps the
shard's staging buffer with CUDA IPC. Rows, readouts and applied gradients must be bitwise
what the gRPC path gives, also through a buffer smaller than the answer, and a read during
unpaced back-to-back swaps must see one version, without failing or reading again (leases).

The tests whose logic is not CUDA's (swaps driven by an admin client against a shard process,
the seam choosing the path a shard process offers) run with shared memory from a CPU shard
process too (`[shm-...]`), so that a mistake in them shows on a machine without a GPU.

    python -m pytest -q -rf --tb=short tests/store/test_transport_cuda.py 2>&1 | tee benchmarks/results/transport_cuda_pytest.txt
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from store_service import persistence
from store_service.client import RemoteShard
from store_service.config import OptimizerConfig, TableConfig
from store_service.serve import start_shard_process
from store_service.table import Table
from store_service.transport.client import BulkPath
from store_service.transport.config import ClientConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (where the shard process keeps its rows, the same-host path that reaches them)
MEDIA = [pytest.param(("cuda", "cuda_ipc"), marks=CUDA, id="cuda_ipc"), pytest.param(("cpu", "shm"), id="shm")]

TOKEN = "transport-cuda"
SMALL = ClientConfig(buffer_bytes=1 << 16, slots=4, timeout_s=60)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


@pytest.fixture(params=["float32", "bfloat16"])
def published(tmp_path, request):
    cfg = TableConfig(d_k=16, d_v=256, segments=[("flat", 20000)], value_dtype=request.param, seed=4,
                      optimizer=OptimizerConfig("sgd", lr=0.5))
    return str(tmp_path), Table.create(cfg, str(tmp_path)).snapshot()


def _serve(root, version, device="cuda", data_paths=()):
    """A shard process; it offers a path beside gRPC only when told (`--data-paths`)."""
    paths = ["--data-paths", ",".join(data_paths)] if data_paths else []
    return start_shard_process(root, version, 0, admin_token=TOKEN, extra_args=["--device", device, *paths])


@CUDA
@pytest.mark.parametrize("rows", [1, 1000, 20000])
def test_cuda_ipc_fetch_and_readout_are_bitwise_the_grpc_path(published, rows):
    root, version = published
    proc = _serve(root, version)
    remote = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=60)
    path = BulkPath.open(proc.address, TOKEN, "cuda_ipc", SMALL)
    try:
        assert path.kind == "cuda_ipc"
        ids = torch.randint(-1, 20000, (rows,), generator=torch.Generator().manual_seed(rows))
        got = path.fetch(ids)
        assert got.device.type == "cuda"
        assert torch.equal(_bits(got), _bits(remote.fetch(ids)))
        rid = ids[: rows - rows % 4].reshape(-1, 4) if rows >= 4 else ids.reshape(1, -1)
        w = torch.rand(rid.shape, generator=torch.Generator().manual_seed(1))
        assert torch.equal(_bits(path.readout(rid, w)), _bits(remote.readout(rid, w)))
    finally:
        path.close()
        remote.close()
        proc.stop()


@CUDA
def test_shm_from_a_gpu_shard_to_a_gpu_client_is_bitwise_the_grpc_path(published):
    """Rows on the shard's GPU, gathered into page-locked shared memory, copied to the client's GPU."""
    root, version = published
    proc = _serve(root, version)
    remote = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=60)
    path = BulkPath.open(proc.address, TOKEN, "shm", ClientConfig(buffer_bytes=1 << 16, slots=4, device="cuda:0"))
    try:
        ids = torch.randint(-1, 20000, (5000,), generator=torch.Generator().manual_seed(7))
        got = path.fetch(ids)
        assert got.device.type == "cuda"
        assert torch.equal(_bits(got), _bits(remote.fetch(ids)))
        grads = torch.randn(5000, 256, device="cuda")
        path.accumulate_value_grads(ids, grads, request_id="s")   # from the GPU through shared memory
    finally:
        path.close()
        remote.close()
        proc.stop()


@CUDA
def test_cuda_ipc_gradients_are_applied_as_over_grpc(published):
    # Three or more gradients of one row are summed in float32 at end_step: on a GPU that sum
    # must not depend on the order of CUDA atomics (step.merge_grads), or the float32 table
    # differs from its twin in a last bit (H100, f0fa7bf; bfloat16 rounding hid it).
    root, version = published
    a, b = _serve(root, version), _serve(root, version)
    ra, rb = RemoteShard(a.address, admin_token=TOKEN), RemoteShard(b.address, admin_token=TOKEN)
    path = BulkPath.open(a.address, TOKEN, "cuda_ipc", SMALL)
    try:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(-1, 20000, (3000,), generator=g)
        grads = torch.randn(3000, 256, generator=g)
        path.accumulate_value_grads(ids, grads.cuda(), request_id="g")
        rb.accumulate_value_grads(ids, grads, request_id="g")
        assert ra.end_step(0) == rb.end_step(0) == 1
        every = torch.arange(20000)
        assert torch.equal(_bits(ra.fetch(every)), _bits(rb.fetch(every)))
    finally:
        path.close()
        for r in (ra, rb):
            r.close()
        a.stop()
        b.stop()


@pytest.mark.parametrize("medium", MEDIA)
def test_cuda_ipc_reads_during_swaps_see_one_version(published, medium):
    root, v1 = published
    device, kind = medium
    for shift, v in ((1000.0, v1 + 1), (2000.0, v1 + 2)):
        with persistence.staged_version(root, v) as stage:
            data = persistence.read_shard(persistence.version_path(root, v1), 0)
            # Shifted in the table's dtype: bfloat16 values are stored as uint16 bits, and
            # those + a float are float64, read back as rows four times as wide.
            dtype = data.attrs["value_dtype"]
            values = persistence.from_numpy(data.arrays["values"], dtype) + shift
            arrays = dict(data.arrays, values=persistence.to_numpy(values.to(getattr(torch, dtype))))
            persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=v), arrays))
            persistence.finish_version(stage, v)
    proc = _serve(root, v1, device)
    # store_root: the server takes admin paths relative to its root (admin_paths.confine);
    # without it an absolute root is refused (InvalidArgument) before any swap.
    admin = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=60, store_root=root)
    ids = torch.arange(20000)
    path = BulkPath.open(proc.address, TOKEN, kind, ClientConfig(buffer_bytes=1 << 20, slots=4, retries=50))
    want = {v1: _bits(admin.fetch(ids))}
    for v in (v1 + 1, v1 + 2):   # each version's rows as the gRPC path reads them
        admin.prepare_version(root, v)
        admin.flip_version(v)
        admin.release_version(v - 1)
        want[v] = _bits(admin.fetch(ids))
    stop, seen, failures, flips = threading.Event(), [], [], [0]

    def swap():
        # Unpaced, back to back. Before leases a GPU shard swapped faster than a read of 20,000
        # rows through a 1 MiB buffer (dozens of pieces) completed, so every attempt found its
        # pinned version released and the read ended in StaleVersion (H100, 2026-12-07; the test
        # then paced swaps at 20 ms). Now each read holds a lease on its version
        # (store_service/leases.py): it finishes on it without reading again.
        serving = v1 + 2
        try:
            while not stop.is_set():
                nxt = v1 + (serving - v1 + 1) % 3
                admin.prepare_version(root, nxt)
                admin.flip_version(nxt)
                admin.release_version(serving)
                serving = nxt
                flips[0] += 1
        except Exception as exc:
            failures.append(exc)

    def read():
        try:
            while not stop.is_set():
                got = _bits(path.fetch(ids))
                match = [v for v, rows in want.items() if torch.equal(got, rows)]
                seen.append(match[0] if len(match) == 1 else None)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=swap), threading.Thread(target=read)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60   # until reads saw two versions, at most a minute
    while time.monotonic() < deadline and not failures and not (
            flips[0] >= 10 and len(seen) >= 10 and len(set(seen)) >= 2):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(60)
    path.close()
    admin.close()
    proc.stop()
    assert not failures, failures
    assert seen and None not in seen and len(set(seen)) >= 2, seen
    assert flips[0] >= 10 and path.rereads == 0, (flips[0], path.rereads)


@pytest.mark.parametrize("medium", MEDIA)
def test_cuda_ipc_through_the_data_path_seam(published, medium):
    """RemoteShard(data_paths=("cuda_ipc",)) against a GPU shard process offering it
    (`--data-paths cuda_ipc`) picks CUDA IPC and answers bitwise what the gRPC path answers."""
    root, version = published
    device, kind = medium
    proc = _serve(root, version, device, data_paths=(kind,))
    grpc_only = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=60)
    fast = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=60, data_paths=(kind,), device=device)
    try:
        ids = torch.randint(-1, 20000, (5000,), generator=torch.Generator().manual_seed(11))
        got = fast.fetch(ids)
        assert fast.data_path_kind == kind
        assert torch.equal(_bits(got), _bits(grpc_only.fetch(ids)))
    finally:
        fast.close()
        grpc_only.close()
        proc.stop()


@pytest.mark.parametrize("medium", MEDIA)
def test_cuda_ipc_readout_backward_through_the_seam_is_bitwise_grpc(published, medium):
    """readout_backward's grad_out through CUDA IPC (RemoteShard's DataPath seam) leaves the
    table bitwise as the gRPC path does after end_step, with the same grad of the weights."""
    root, version = published
    device, kind = medium
    a, b = _serve(root, version, device, data_paths=(kind,)), _serve(root, version, device)
    fast = RemoteShard(a.address, admin_token=TOKEN, timeout_s=60, data_paths=(kind,), device=device)
    plain = RemoteShard(b.address, admin_token=TOKEN, timeout_s=60)
    try:
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(-1, 20000, (512, 8), generator=g)
        w = torch.rand(512, 8, generator=g)
        grad_out = torch.randn(512, 256, generator=g)
        got = fast.readout_backward(ids, w, grad_out, request_id="rb")
        assert fast.data_path_kind == kind
        assert torch.equal(_bits(got), _bits(plain.readout_backward(ids, w, grad_out, request_id="rb")))
        assert fast.end_step(0) == plain.end_step(0) == 1
        every = torch.arange(20000)
        assert torch.equal(_bits(fast.fetch(every)), _bits(plain.fetch(every)))
    finally:
        fast.close()
        plain.close()
        a.stop()
        b.stop()
