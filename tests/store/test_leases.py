"""Pinned-version leases (store_service/leases.py): a released version lives on for its
leases only, at most one retired version per shard, bounded lifetimes, caps per caller,
leases of a dead client dropped, roles unchanged."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import auth, errors, persistence, wire
from store_service.client import error_from_rpc
from store_service.config import TableConfig
from store_service.datapath import error_from_wire, error_to_wire
from store_service.leases import LeasePolicy
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table

TOKEN = "lease-admin"
IDS = torch.arange(50)


@pytest.fixture
def published(tmp_path):
    """A store root with versions v, v+1, v+2 whose rows differ (+1000, +2000)."""
    root = str(tmp_path)
    v = Table.create(TableConfig(d_k=4, d_v=8, segments=[("flat", 50)], seed=2), root).snapshot()
    for shift, dst in ((1000.0, v + 1), (2000.0, v + 2)):
        with persistence.staged_version(root, dst) as stage:
            data = persistence.read_shard(persistence.version_path(root, v), 0)
            arrays = dict(data.arrays, values=data.arrays["values"] + shift)
            persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=dst), arrays))
            persistence.finish_version(stage, dst)
    return root, v


def _swap(shard: Shard, root: str, to: int) -> None:
    old = shard.serving_version
    shard.prepare_version(root, to)
    shard.flip_version(to)
    shard.release_version(old)


def test_a_released_version_lives_on_for_its_lease_only(published):
    root, v = published
    shard = Shard.load(root, v, 0)
    want = shard.fetch(IDS)
    lease, pinned = shard.lease_version(0, holder="a")
    assert pinned == v
    _swap(shard, root, v + 1)
    assert shard.held_versions()["retired"] == [v]
    assert torch.equal(shard.fetch(IDS, version=v, lease=lease), want)       # through the lease
    with pytest.raises(errors.StaleVersion):
        shard.fetch(IDS, version=v)                                           # not without it
    with pytest.raises(errors.StaleVersion):
        shard.accumulate_value_grads(IDS, torch.ones(50, 8), version=v)       # no gradient lands on it
    with pytest.raises(errors.StaleVersion):
        shard.lease_version(v, holder="b")                                    # no new lease extends it
    shard.release_lease(lease)
    assert shard.held_versions()["retired"] == []
    with pytest.raises(errors.StaleVersion):
        shard.fetch(IDS, version=v, lease=lease)


def test_a_third_swap_waits_for_the_oldest_lease_then_revokes_it(published):
    """At most one retired version per shard: a release that would keep a second waits up to
    wait_s for the older one's leases, then revokes them (their reader gets StaleVersion)."""
    root, v = published
    shard = Shard.load(root, v, 0)
    shard.leases.policy = LeasePolicy(wait_s=0.5)
    first, _ = shard.lease_version(0, holder="a")
    _swap(shard, root, v + 1)
    second, _ = shard.lease_version(0, holder="b")
    want = shard.fetch(IDS)
    t0 = time.monotonic()
    _swap(shard, root, v + 2)
    assert time.monotonic() - t0 >= 0.5
    held = shard.held_versions()
    assert held["retired"] == [v + 1] and held["serving"] == [v + 2] and shard.leases.revoked == 1
    with pytest.raises(errors.StaleVersion):
        shard.fetch(IDS, version=v, lease=first)
    assert torch.equal(shard.fetch(IDS, version=v + 1, lease=second), want)


def test_a_third_swap_goes_on_as_soon_as_the_oldest_lease_is_released(published):
    root, v = published
    shard = Shard.load(root, v, 0)
    shard.leases.policy = LeasePolicy(wait_s=30.0)
    first, _ = shard.lease_version(0, holder="a")
    _swap(shard, root, v + 1)
    shard.lease_version(0, holder="b")
    threading.Timer(0.3, shard.release_lease, args=(first,)).start()
    t0 = time.monotonic()
    _swap(shard, root, v + 2)
    assert 0.25 <= time.monotonic() - t0 < 10
    assert shard.held_versions()["retired"] == [v + 1] and shard.leases.revoked == 0


def test_leases_expire_and_the_retired_version_goes_with_them(published):
    root, v = published
    shard = Shard.load(root, v, 0)
    shard.leases.policy = LeasePolicy(ttl_s=0.3)
    lease, _ = shard.lease_version(0, holder="a", ttl_s=60.0)   # capped by the policy
    _swap(shard, root, v + 1)
    assert shard.held_versions()["retired"] == [v]
    deadline = time.monotonic() + 5
    while shard.held_versions()["retired"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert shard.held_versions() == {"serving": [v + 1], "pending": [], "retiring": [], "retired": [], "leased": []}
    with pytest.raises(errors.StaleVersion):
        shard.fetch(IDS, version=v, lease=lease)


def test_a_lapsed_lease_on_the_serving_version_says_so_in_process_and_over_grpc(published):
    """A read that outlives its lease is refused even though its version still serves (the
    lease is the read's pin), and the error says why: "version 1 is not held; serving 1" alone
    reads as a contradiction (the H100 test log of 2026-12-07)."""
    root, v = published
    shard = Shard.load(root, v, 0)
    shard.leases.policy = LeasePolicy(ttl_s=0.2)
    lease, _ = shard.lease_version(0, holder="a", ttl_s=60.0)
    time.sleep(0.3)
    with pytest.raises(errors.StaleVersion, match="lease lapsed") as err:
        shard.fetch(IDS, version=v, lease=lease)
    assert err.value.requested == err.value.serving == v
    server = serve_shard(shard, admin_token=TOKEN)
    try:
        req = wire.fetch_request_to_proto(IDS, None, None, "", v)
        req.lease = lease
        with pytest.raises(grpc.RpcError) as rpc:
            _stub(server.address).Fetch(req, metadata=((wire.MD_AUTHORIZATION, wire.bearer(TOKEN)),))
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        remote = error_from_rpc(rpc.value, 0, server.address)
        assert isinstance(remote, errors.StaleVersion) and remote.reason == err.value.reason
        assert "lease lapsed" in str(remote)
    finally:
        server.stop(grace=None)
    wired = error_from_wire(error_to_wire(err.value), 0, "here")     # the transports' own channel
    assert isinstance(wired, errors.StaleVersion) and str(wired) == str(err.value)


def test_leases_are_capped_per_caller_and_in_all(published):
    root, v = published
    shard = Shard.load(root, v, 0)
    shard.leases.policy = LeasePolicy(max_per_holder=3, max_total=5)
    for _ in range(3):
        shard.lease_version(0, holder="a")
    with pytest.raises(errors.ResourceExhausted):
        shard.lease_version(0, holder="a")
    shard.lease_version(0, holder="b")
    shard.lease_version(0, holder="c")
    with pytest.raises(errors.ResourceExhausted):
        shard.lease_version(0, holder="d")
    shard.drop_leases("a")
    assert len(shard.held_versions()["leased"]) == 2
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(errors.InvalidArgument):
            shard.lease_version(0, holder="e", ttl_s=bad)


def _stub(address: str):
    return pb_grpc.KnowledgeStoreStub(grpc.insecure_channel(address))


def test_lease_calls_need_credentials_and_a_lease_is_its_own_capability(published):
    root, v = published
    shard = Shard.load(root, v, 0)
    tokens = auth.Tokens(admin=TOKEN, train="lease-train", read="lease-read")
    server = serve_shard(shard, tokens=tokens)
    try:
        stub = _stub(server.address)
        with pytest.raises(grpc.RpcError) as err:
            stub.LeaseVersion(pb.LeaseRequest(version=0, ttl_s=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        read = ((wire.MD_AUTHORIZATION, wire.bearer("lease-read")),)
        resp = stub.LeaseVersion(pb.LeaseRequest(version=0, ttl_s=5), metadata=read)
        assert resp.version == v and len(resp.lease) == 32
        with pytest.raises(grpc.RpcError) as err:    # a session that is not one of this shard's
            stub.LeaseVersion(pb.LeaseRequest(version=0, ttl_s=5, session="0" * 32), metadata=read)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.LeaseVersion(pb.LeaseRequest(version=0, ttl_s=0), metadata=read)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # usage counts through a lease still need the train role
        req = wire.fetch_request_to_proto(IDS, torch.ones(50, dtype=torch.int64), torch.ones(50, dtype=torch.float64),
                                          "", v)
        req.lease = resp.lease
        with pytest.raises(grpc.RpcError) as err:
            stub.Fetch(req, metadata=read)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.ReleaseLease(pb.ReleaseLeaseRequest(lease="not-a-lease"), metadata=read)   # changes nothing
        assert shard.held_versions()["leased"] == [v]
        stub.ReleaseLease(pb.ReleaseLeaseRequest(lease=resp.lease), metadata=read)
        assert shard.held_versions()["leased"] == []
    finally:
        server.stop(grace=None)


def _wait_until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


@pytest.mark.parametrize("kind", ["shm", "grpc"])
def test_the_leases_of_a_client_that_dies_go(published, kind):
    """A client process takes a lease and is killed: over a same-host session its leases go at
    once with the session (the handoff connection closes); over gRPC they lapse at their deadline."""
    root, v = published
    shard = Shard.load(root, v, 0)
    shard.leases.policy = LeasePolicy(ttl_s=60.0 if kind == "shm" else 1.0)
    server = serve_shard(shard, admin_token=TOKEN)
    if kind == "shm":
        take = ("from store_service.transport.client import BulkPath; "
                "from store_service.transport.config import ClientConfig; "
                f"p = BulkPath.open({server.address!r}, {TOKEN!r}, 'shm', ClientConfig(buffer_bytes=1 << 16)); "
                "p._lease(0)")
    else:
        take = ("import grpc; from protos import knowledge_store_pb2 as pb, knowledge_store_pb2_grpc as g; "
                f"g.KnowledgeStoreStub(grpc.insecure_channel({server.address!r})).LeaseVersion("
                f"pb.LeaseRequest(version=0, ttl_s=60), metadata=(('authorization', 'Bearer {TOKEN}'),))")
    script = f"import time; {take}; print('leased', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "leased"
        assert shard.held_versions()["leased"] == [v]
        _swap(shard, root, v + 1)
        assert shard.held_versions()["retired"] == [v]   # kept for the live client's lease
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert _wait_until(lambda: shard.held_versions()["retired"] == [], 10.0)
    assert shard.held_versions()["leased"] == []
    server.stop(grace=None)
