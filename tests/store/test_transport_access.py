"""Who gets a bulk path, and what happens when it cannot be had or is lost: no handle without
credentials, a ticket works once, an unknown session or a bad placement changes nothing,
another host falls back to gRPC, and a dead shard surfaces as the gRPC path's own error."""
from __future__ import annotations

import grpc
import pytest
import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, wire
from store_service.client import RemoteShard
from store_service.config import TableConfig
from store_service.serve import start_shard_process
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.transport import handoff, hostid
from store_service.transport.client import BulkPath, open_path
from store_service.transport.config import ClientConfig
from store_service.transport.shard import FastRemoteShard

TOKEN = "transport-access"
CFG = ClientConfig(buffer_bytes=1 << 16, slots=2, timeout_s=10)


@pytest.fixture
def served():
    shard = Shard(TableConfig(d_k=8, d_v=16, segments=[("flat", 100)], seed=2))
    server = serve_shard(shard, admin_token=TOKEN)
    channel = grpc.insecure_channel(server.address)
    yield server, shard, pb_grpc.StoreTransportStub(channel)
    channel.close()
    server.stop(grace=None)


def _open(stub, token=TOKEN, **kw):
    md = ((wire.MD_AUTHORIZATION, wire.bearer(token)),) if token else ()
    req = pb.OpenTransportRequest(kind=kw.pop("kind", "shm"), host_id=kw.pop("host_id", hostid.host_id()),
                                  buffer_bytes=kw.pop("buffer_bytes", 1 << 16))
    return stub.Open(req, metadata=md, timeout=10)


@pytest.mark.parametrize("kind", ["shm", "torch_dist"])
@pytest.mark.parametrize("token", ["", "wrong"])
def test_no_handle_without_credentials(served, kind, token):
    server, _, stub = served
    with pytest.raises(grpc.RpcError) as err:
        _open(stub, token, kind=kind)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(errors.Unauthenticated):
        BulkPath.open(server.address, token, kind, CFG)


def test_a_ticket_is_redeemed_once_and_a_bad_one_never(served):
    _, _, stub = served
    resp = _open(stub)
    header, fds, lease = handoff.receive(resp.socket, resp.ticket)
    assert header["session"] == resp.session and len(fds) == 1
    for fd in fds:
        __import__("os").close(fd)
    lease.close()
    with pytest.raises(errors.Unauthenticated):
        handoff.receive(resp.socket, resp.ticket)           # replayed
    with pytest.raises(errors.Unauthenticated):
        handoff.receive(resp.socket, "not-a-ticket")
    with pytest.raises(errors.Unauthenticated):
        handoff.receive(resp.socket, resp.ticket[:-1] + "x")


def test_unknown_sessions_and_bad_placements_change_nothing(served):
    server, shard, stub = served
    before = shard.state_dict()
    ids = pb.Tensor()
    wire.ids_to_proto(torch.arange(4), ids)
    grads = pb.PlacedTensor(dtype="float32", shape=[4, 16])
    bad_session = pb.PlacedGradsRequest(at=pb.Placement(session="f" * 32, capacity=256), kind="value",
                                        request_id="x", ids=ids, grads=grads)
    md = ((wire.MD_AUTHORIZATION, wire.bearer(TOKEN)),)
    with pytest.raises(grpc.RpcError) as err:      # a session id is not enough: each call needs its role too
        stub.PushGrads(bad_session, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.PushGrads(bad_session, timeout=10, metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    session = _open(stub).session
    for at in (pb.Placement(session=session, offset=(1 << 16) - 64, capacity=256),   # past the end
               pb.Placement(session=session, offset=3, capacity=256),                # misaligned
               pb.Placement(session=session, offset=0, capacity=16)):                # too small
        req = pb.PlacedGradsRequest(at=at, kind="value", request_id="y", ids=ids, grads=grads)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushGrads(req, timeout=10, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata())[wire.MD_FIELD] == "at"
    shard.end_step(0)
    after = shard.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "step")


def test_another_host_falls_back_to_grpc(served):
    server, shard, stub = served
    with pytest.raises(grpc.RpcError) as err:
        _open(stub, host_id="some-other-host/0")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    elsewhere = ClientConfig(kinds=("shm", "cuda_ipc"), host_id="some-other-host/0", timeout_s=10)
    assert open_path(server.address, TOKEN, elsewhere) is None
    fast = FastRemoteShard(RemoteShard(server.address, admin_token=TOKEN), TOKEN, elsewhere)
    try:
        assert fast.kind == "grpc"
        ids = torch.tensor([3, -1, 99])
        assert torch.equal(fast.fetch(ids), shard.fetch(ids))
    finally:
        fast.close()
    # across hosts the torch.distributed path is still offered
    across = ClientConfig(host_id="some-other-host/0", timeout_s=10)
    path = open_path(server.address, TOKEN, across)
    assert path is not None and path.kind == "torch_dist"
    path.close()


@pytest.mark.parametrize("kind", ["shm", "torch_dist"])
def test_a_dead_shard_is_the_grpc_paths_error(tmp_path, kind):
    version = Table.create(TableConfig(d_k=8, d_v=16, segments=[("flat", 100)]), str(tmp_path)).snapshot()
    proc = start_shard_process(str(tmp_path), version, 0, admin_token=TOKEN)
    cfg = ClientConfig(kinds=(kind,), timeout_s=3)
    remote = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=3, retries=1)
    path = BulkPath.open(proc.address, TOKEN, kind, cfg)
    fast = FastRemoteShard(RemoteShard(proc.address, admin_token=TOKEN, timeout_s=3, retries=1), TOKEN, cfg)
    ids = torch.arange(10)
    try:
        assert torch.equal(path.fetch(ids), remote.fetch(ids)) and fast.kind == kind
        proc.proc.kill()
        proc.proc.wait()
        with pytest.raises(errors.ShardUnavailable) as via_grpc:
            remote.fetch(ids)
        with pytest.raises(errors.ShardUnavailable) as via_path:
            path.fetch(ids)
        with pytest.raises(errors.ShardUnavailable):
            fast.fetch(ids)
        assert via_path.value.address == via_grpc.value.address
    finally:
        path.close()
        fast.close()
        remote.close()
        proc.stop()


def test_a_silent_peer_on_the_handoff_socket_blocks_nobody(served):
    import socket
    import time
    _, _, stub = served
    resp = _open(stub)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect("\0" + resp.socket)   # connects, never sends its ticket
        t0 = time.monotonic()
        header, fds, lease = handoff.receive(resp.socket, resp.ticket, timeout_s=3)
        assert time.monotonic() - t0 < 2 and header["session"] == resp.session
        for fd in fds:
            __import__("os").close(fd)
        lease.close()


def test_a_client_that_dies_leaves_no_buffer_behind(served):
    """The handoff connection is a lease: when the client process dies, its session goes."""
    import subprocess
    import sys
    import time
    from store_service.transport.registry import SessionTable
    server, shard, _ = served
    table = SessionTable.of(shard)
    before = len(table)
    script = ("import sys, time; from store_service.transport.client import BulkPath; "
              "from store_service.transport.config import ClientConfig; "
              f"p = BulkPath.open({server.address!r}, {TOKEN!r}, 'shm', ClientConfig(buffer_bytes=1 << 16)); "
              "print('open', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        assert len(table) == before + 1
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 10
    while len(table) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(table) == before
