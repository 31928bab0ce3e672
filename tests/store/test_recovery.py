"""Issue 18's scenarios 7-9 played over real gRPC: a shard restarted mid-training makes
the table refuse to train or publish until `recover` rolls every shard back, after which
training matches an uninterrupted run resumed from that version; a restarted shard is
reached again quickly; back-to-back swaps under load fail no call; staging left by a
crashed publisher is removed (and a live one's is not)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from protos import knowledge_store_pb2 as pb
from store_service import errors, persistence
from store_service.auth import Tokens
from store_service.client import RemoteShard, connect
from store_service.config import OptimizerConfig, TableConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table

D_K, D_V, N = 8, 16, 200
TOKENS = Tokens(admin="adm", train="trn", read="rd")


def _cfg(num_shards: int = 2) -> TableConfig:
    return TableConfig(d_k=D_K, d_v=D_V, segments=[("flat", N)], num_shards=num_shards,
                       optimizer=OptimizerConfig("adam", lr=0.05))


def _train(table: Table, start: int, steps: int) -> list[float]:
    """A deterministic readout regression on the table's rows: step s's batch depends on s only."""
    losses = []
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        ids, w = torch.randint(0, N, (8, 4), generator=g), torch.rand(8, 4, generator=g)
        target = torch.randn(8, D_V, generator=g)
        out = table.readout(ids, w)
        losses.append(float(((out - target) ** 2).mean()))
        table.readout_backward(ids, w, 2 * (out - target) / out.numel())
        table.end_step(s, timeout_s=30)
    return losses


def _close(table: Table) -> None:
    table.close()
    for s in table.shards:
        if hasattr(s, "close"):
            s.close()


def _one_served_shard(tmp_path, token: str):
    """A one-shard version served over gRPC and a client that has reached it:
    (store root, version, server, client)."""
    root = str(tmp_path)
    t = Table.create(_cfg(1), root)
    v = t.snapshot()
    t.close()
    server = serve_shard(Shard.load(root, v, 0), tokens=TOKENS)
    client = RemoteShard(server.address, token=token, timeout_s=10)
    client.describe()
    return root, v, server, client


def test_restarted_shard_stops_training_until_recovered_then_matches_an_uninterrupted_run(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    v1 = t.snapshot()
    t.close()
    servers = [serve_shard(Shard.load(root, v1, i), tokens=TOKENS) for i in range(2)]
    table = connect([s.address for s in servers], token=TOKENS.admin, store_root=root, timeout_s=30,
                    refresh_wait_s=1.0)
    try:
        _train(table, 0, 3)
        checkpoint = table.snapshot()                                   # version 2 at step 3
        _train(table, 3, 2)
        port = servers[1].port
        servers[1].stop(grace=None)                                     # the shard dies mid-training ...
        servers[1] = serve_shard(Shard.load(root, checkpoint, 1), tokens=TOKENS, port=port)   # ... and comes back
        with pytest.raises(errors.FailedPrecondition, match=r"shard 1 .*version 2 step 3.*recover"):
            _train(table, 5, 1)
        with pytest.raises(errors.FailedPrecondition, match="shard 1"):
            table.snapshot()
        assert persistence.list_versions(root) == [v1, checkpoint]     # nothing published meanwhile
        assert table.recover() == (checkpoint, 3)
        resumed = _train(table, 3, 4)
    finally:
        _close(table)
        for s in servers:
            s.stop(grace=None)
    reference = Table.open(root, checkpoint)                          # uninterrupted, from the same version
    expected = _train(reference, 3, 4)
    reference.close()
    assert resumed == expected


def test_a_restarted_shard_is_reached_again_within_a_second(tmp_path):
    """p95 over 10 restarts, from the restarted server serving to the first successful call
    of a client that saw it go down."""
    root, v, server, client = _one_served_shard(tmp_path, TOKENS.read)
    port = server.port
    waits = []
    try:
        for _ in range(10):
            server.stop(grace=None)
            with pytest.raises(errors.ShardUnavailable):   # the client sees it gone ...
                client._call(client._store.Describe, pb.DescribeRequest(), timeout_s=0.3)
            time.sleep(0.6)                                 # ... long enough for its channel to back off
            server = serve_shard(Shard.load(root, v, 0), tokens=TOKENS, port=port)
            t0 = time.monotonic()
            client.describe()
            waits.append(time.monotonic() - t0)
    finally:
        client.close()
        server.stop(grace=None)
    waits.sort()
    assert waits[math.ceil(0.95 * len(waits)) - 1] <= 1.0, waits   # p95, nearest rank


def test_back_to_back_swaps_under_load_fail_no_call(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    v1 = t.snapshot()
    _train(t, 0, 1)
    v2 = t.snapshot()
    t.close()
    servers = [serve_shard(Shard.load(root, v1, i), tokens=TOKENS) for i in range(2)]
    addresses = [s.address for s in servers]
    readers = [connect(addresses, token=TOKENS.read, timeout_s=30) for _ in range(2)]
    admin = connect(addresses, token=TOKENS.admin, store_root=root, timeout_s=60)
    stop, failures, calls = threading.Event(), [], [0]

    def hammer(table: Table, worker: int) -> None:
        g = torch.Generator().manual_seed(worker)
        while not stop.is_set():
            try:
                table.search(torch.randn(4, D_K, generator=g), 5)
                table.fetch(torch.randint(0, N, (16,), generator=g))
                calls[0] += 2
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=hammer, args=(readers[w % 2], w)) for w in range(4)]
    for th in threads:
        th.start()
    try:
        for i in range(50):
            admin.load_version(v2 if i % 2 == 0 else v1)
    finally:
        stop.set()
        for th in threads:
            th.join()
        for tb in readers + [admin]:
            _close(tb)
        for s in servers:
            s.stop(grace=None)
    assert failures == [] and calls[0] > 0


def _stage_of_dead_process(root: str) -> str:
    """A publisher that dies (SIGKILL) with its staging directory half written (named as
    `persistence.new_stage` names it: version, host, pid)."""
    code = ("import os, signal, sys; stage = sys.argv[1] % os.getpid(); os.makedirs(stage); print(stage, flush=True); "
            "open(os.path.join(stage, 'partial'), 'w').write('x'); os.kill(os.getpid(), signal.SIGKILL)")
    template = os.path.join(root, "staging", f"v00000042-h{persistence._HOST}-p%d-89abcdef")
    out = subprocess.run([sys.executable, "-c", code, template], capture_output=True, text=True)
    stage = out.stdout.strip()
    assert os.path.isdir(stage), out.stderr
    return stage


def test_staging_of_a_crashed_publisher_is_removed_and_a_live_ones_kept(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(1), root)
    v = t.snapshot()
    dead = _stage_of_dead_process(root)
    live = persistence.new_stage(root, 43)                          # this process: alive
    other_host_recent = os.path.join(root, "staging", "v00000044-h00000000-p1-0123abcd")
    other_host_old = os.path.join(root, "staging", "v00000045-h00000000-p1-4567abcd")
    for d in (other_host_recent, other_host_old):
        os.makedirs(d)
    old = time.time() - persistence.STAGING_LEASE_S - 60
    os.utime(other_host_old, (old, old))
    # a server starting on the root cleans up
    server = serve_shard(Shard.load(root, v, 0), tokens=TOKENS)
    server.stop(grace=None)
    left = sorted(os.listdir(os.path.join(root, "staging")))
    assert left == sorted([os.path.basename(live), os.path.basename(other_host_recent)])
    # so does a publisher
    dead = _stage_of_dead_process(root)
    t.snapshot()
    assert not os.path.exists(dead) and os.path.isdir(live)
    t.close()


@pytest.mark.parametrize("call", ["grads", "stream_fetch", "search"])
def test_raw_data_plane_calls_reach_a_restarted_shard(tmp_path, call):
    """The gRPC data path's raw-bytes calls (row gradients, streamed fetch, search), made while
    the shard is down, retry on the client's reopened channel pool rather than on the channel
    that saw the server die: each is answered within a second of the restarted server serving,
    5 restarts in a row."""
    root, v, server, client = _one_served_shard(tmp_path, TOKENS.admin)
    port = server.port
    ids, big = torch.arange(N), torch.arange(N).repeat(2)[:300]    # 300 ids: a streamed fetch
    do = {"grads": lambda: client.accumulate_value_grads(ids, torch.zeros(N, D_V), request_id=f"r{time.monotonic()}"),
          "stream_fetch": lambda: client.fetch(big),
          "search": lambda: client.search(torch.randn(4, D_K), 3)}[call]
    do()
    waits, servers = [], [server]

    def restart_later():
        time.sleep(0.8)
        servers.append(serve_shard(Shard.load(root, v, 0), tokens=TOKENS, port=port))
        servers[-1].t0 = time.monotonic()

    try:
        for _ in range(5):
            servers[-1].stop(grace=None)
            later = threading.Thread(target=restart_later)
            later.start()
            do()                                         # made while the shard is down
            waits.append(time.monotonic() - servers[-1].t0)
            later.join()
    finally:
        client.close()
        servers[-1].stop(grace=None)
    # retries pause at most 0.375 s (capped backoff); the channel that saw the server die would
    # have raised ValueError (closed) or waited out gRPC's own reconnect backoff (1 s and growing).
    # 1.5 s leaves room for a loaded CI machine; the p95 figure is test_a_restarted_shard_...'s
    assert max(waits) <= 1.5, waits
