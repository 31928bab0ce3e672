"""A reader on a bulk path while the shard swaps versions sees one version, never a torn buffer.

The shard serves v1, v2 = v1 + 1000, v3 = v1 + 2000 in turn (prepare, flip, release, back to
back, unpaced) while reader threads fetch every row through a small staging buffer (or over
gRPC in parts on several channels), so each read is many pieces with swaps landing between
them. Every answer must equal one version's rows exactly (a mix of versions matches none), and
none fails: each read pins its version with a lease (store_service/leases.py), so it finishes
on that version without reading again."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from store_service import persistence
from store_service.client import RemoteShard
from store_service.config import TableConfig
from store_service.grpc_datapath import WireConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.transport.client import BulkPath
from store_service.transport.config import ClientConfig

TOKEN = "transport-swap"


def _publish_shifted(root: str, src: int, dst: int, shift: float) -> None:
    with persistence.staged_version(root, dst) as stage:
        data = persistence.read_shard(persistence.version_path(root, src), 0)
        arrays = dict(data.arrays, values=data.arrays["values"] + shift)
        persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=dst), arrays))
        persistence.finish_version(stage, dst)


class _GrpcReader:
    """RemoteShard's gRPC path with tiny parts: 2000 rows in 4 parts (one per channel) of
    FetchStream pieces of 64 rows, all in flight."""

    def __init__(self, address: str):
        self.remote = RemoteShard(address, admin_token=TOKEN, timeout_s=30,
                                  wire_config=WireConfig(channels=4, stream_min_rows=1, split_min_rows=100,
                                                         chunk_rows=64))
        self.rereads = 0

    def fetch(self, ids):
        return self.remote.fetch(ids)

    def close(self):
        self.remote.close()


def _reader(address: str, kind: str):
    if kind == "grpc":
        return _GrpcReader(address)
    # 8 KiB slots hold 64 rows: a read of 2000 rows is 32 pieces.
    return BulkPath.open(address, TOKEN, kind, ClientConfig(buffer_bytes=4 * 8192, slots=4, timeout_s=30, retries=50))


@pytest.mark.parametrize("kind", ["shm", "torch_dist", "grpc"])
def test_reads_during_swaps_see_one_version(tmp_path, kind):
    root = str(tmp_path)
    v1 = Table.create(TableConfig(d_k=8, d_v=32, segments=[("flat", 2000)], seed=9), root).snapshot()
    _publish_shifted(root, v1, v1 + 1, 1000.0)
    _publish_shifted(root, v1, v1 + 2, 2000.0)
    ids = torch.arange(2000)
    want = {v: Shard.load(root, v, 0).fetch(ids) for v in (v1, v1 + 1, v1 + 2)}
    shard = Shard.load(root, v1, 0)
    server = serve_shard(shard, admin_token=TOKEN, max_workers=16)
    paths = [_reader(server.address, kind) for _ in range(2)]
    stop, flips, seen, failures = threading.Event(), [0], [], []

    def swap():
        serving = v1
        try:
            while not stop.is_set():
                nxt = v1 + (serving - v1 + 1) % 3
                shard.prepare_version(root, nxt)
                shard.flip_version(nxt)
                shard.release_version(serving)
                serving = nxt
                flips[0] += 1
                # Back to back, unpaced: a release waits (bounded) while reads hold leases on the
                # one retired version a shard keeps, so swaps never starve reads.
                retired = shard.held_versions()["retired"]
                if len(retired) > 1:
                    failures.append(AssertionError(f"{retired} retired versions kept"))
        except Exception as exc:
            failures.append(exc)

    def read(path):
        try:
            while not stop.is_set():
                got = path.fetch(ids)
                match = [v for v, rows in want.items() if torch.equal(got, rows)]
                seen.append(match[0] if len(match) == 1 else None)
        except Exception as exc:   # any failure is reported below
            failures.append(exc)

    threads = [threading.Thread(target=swap)] + [threading.Thread(target=read, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    # Until enough reads overlapped enough swaps (a loaded machine needs longer), at most 30 s.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not failures and not (
            flips[0] >= 10 and len(seen) >= 10 and len(set(seen)) >= 2):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(30)
    for p in paths:
        p.close()
    server.stop(grace=None)
    assert not failures, failures
    assert None not in seen, "a read mixed versions"
    assert flips[0] >= 10 and len(seen) >= 10 and len(set(seen)) >= 2, (flips[0], len(seen), set(seen))
    assert [p.rereads for p in paths] == [0, 0], "a read started again: its lease did not hold its version"
    assert shard.leases.revoked == 0 and shard.held_versions()["leased"] == []


@pytest.mark.parametrize("kind", ["shm", "torch_dist"])
def test_reads_during_steps_see_one_step(kind):
    """The same for optimizer steps landing between the pieces of a read: every answer equals
    the rows after one step (a twin shard given the same gradients gives each step's rows)."""
    from store_service.config import OptimizerConfig
    cfg = TableConfig(d_k=8, d_v=32, segments=[("flat", 2000)], seed=3, optimizer=OptimizerConfig("sgd", lr=0.5))
    shard, twin = Shard(cfg), Shard(cfg)
    ids = torch.arange(2000)
    grads = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    steps = 15
    want = [twin.fetch(ids)]
    for s in range(steps):
        twin.accumulate_value_grads(ids, grads, request_id=f"s{s}")
        twin.end_step(s)
        want.append(twin.fetch(ids))
    server = serve_shard(shard, admin_token=TOKEN, max_workers=16)
    path = BulkPath.open(server.address, TOKEN, kind,
                         ClientConfig(buffer_bytes=4 * 8192, slots=4, timeout_s=30, retries=50))
    stop, seen, failures, first = threading.Event(), [], [], []

    def step():
        # Steps about one read apart (a read is 32 pieces), so many land between two pieces
        # and most reads still finish within their retries.
        while not first and not stop.is_set():
            time.sleep(0.01)
        pace = random.Random(0)
        for s in range(steps):
            time.sleep(pace.uniform(0.5, 1.5) * first[0])
            shard.accumulate_value_grads(ids, grads, request_id=f"s{s}")
            shard.end_step(s)
        stop.set()

    def read():
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                got = path.fetch(ids)
                first.append(time.monotonic() - t0)
                match = [s for s, rows in enumerate(want) if torch.equal(got, rows)]
                seen.append(match[0] if len(match) == 1 else None)
        except Exception as exc:   # reported below
            failures.append(exc)

    threads = [threading.Thread(target=read), threading.Thread(target=step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    path.close()
    server.stop(grace=None)
    assert not failures, failures
    assert seen and None not in seen, "a read mixed steps"
    assert len(set(seen)) >= 2, seen
