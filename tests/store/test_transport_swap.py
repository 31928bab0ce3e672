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


@pytest.mark.parametrize("kind", ["shm", "grpc"])
def test_reads_during_rollbacks_to_the_number_a_trained_state_holds_see_one_state(tmp_path, kind):
    """The shard trains the state it loaded as v1, then swaps back to the published v1 as
    Table.load_version does (the trained state disowned to an unpublished label first), over
    and over. A read in pieces leased the trained state: a piece naming that lease after the
    disowning gets StaleVersion and the read starts again; it never gets rows of the reloaded
    v1 under the same number. Every answer equals the published or the trained rows."""
    from store_service import labels
    from store_service.client import connect
    from store_service.config import OptimizerConfig
    root = str(tmp_path)
    cfg = TableConfig(d_k=8, d_v=32, segments=[("flat", 2000)], seed=9, optimizer=OptimizerConfig("sgd", lr=0.5))
    v1 = Table.create(cfg, root).snapshot()
    ids = torch.arange(2000)
    grads = torch.randn(2000, 32, generator=torch.Generator().manual_seed(1))
    twin = Shard.load(root, v1, 0)
    want = [twin.fetch(ids)]
    twin.accumulate_value_grads(ids, grads)
    twin.end_step(0)
    want.append(twin.fetch(ids))   # the rows after one step from v1: what every cycle trains to
    shard = Shard.load(root, v1, 0)
    server = serve_shard(shard, admin_token=TOKEN, max_workers=16)
    if kind == "grpc":   # through a table: it refreshes its map and reads again on StaleVersion
        reader = connect([server.address], token=TOKEN, timeout_s=30, wire_config=WireConfig(
            channels=4, stream_min_rows=1, split_min_rows=100, chunk_rows=64))
    else:
        reader = _reader(server.address, kind)
    stop, cycles, seen, failures = threading.Event(), [0], [], []
    # No read runs across the training step: a step between the pieces of one read is another
    # test's (test_reads_during_steps_see_one_step); this one is about the swaps' labels.
    gate, reading, training = threading.Condition(), [0], [False]

    def rollback():
        try:
            while not stop.is_set():
                time.sleep(0.05)   # reads of the published v1
                with gate:
                    training[0] = True
                    gate.wait_for(lambda: reading[0] == 0)
                shard.accumulate_value_grads(ids, grads)
                shard.end_step(0)
                with gate:
                    training[0] = False
                    gate.notify_all()
                time.sleep(0.05)   # reads of the trained state
                disowned = labels.unpublished_label()
                shard.relabel_version(v1, disowned)
                shard.prepare_version(root, v1)
                shard.flip_version(v1)
                shard.release_version(disowned)
                cycles[0] += 1
        except Exception as exc:
            failures.append(exc)

    def read():
        try:
            while not stop.is_set():
                with gate:
                    gate.wait_for(lambda: not training[0])
                    reading[0] += 1
                try:
                    got = reader.fetch(ids)
                finally:
                    with gate:
                        reading[0] -= 1
                        gate.notify_all()
                match = [i for i, rows in enumerate(want) if torch.equal(got, rows)]
                seen.append(match[0] if len(match) == 1 else None)
        except Exception as exc:   # reported below
            failures.append(exc)

    threads = [threading.Thread(target=rollback)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not failures and not (
            cycles[0] >= 20 and len(seen) >= 20 and len(set(seen)) >= 2):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(30)
    if kind == "grpc":
        reader.close()
        for s in reader.shards:
            s.close()
    else:
        reader.close()
    server.stop(grace=None)
    assert not failures, failures
    assert None not in seen, "a read mixed the trained and the published rows"
    assert cycles[0] >= 20 and len(seen) >= 20 and len(set(seen)) >= 2, (cycles[0], len(seen), set(seen))
