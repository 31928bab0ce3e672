"""Issue 18, case 5: every RPC checks its caller's role (read < train < admin), TLS and
mutual TLS through grpc's credentials with certificates the test makes, token files of
mode 0600, and a cluster that generates its own tokens (no fixed default)."""
from __future__ import annotations

import os
import stat

import grpc
import pytest
import torch

from cluster.config import ClusterConfig
from protos import knowledge_store_pb2 as pb
from store_service import auth, errors, wire
from store_service.client import RemoteShard
from store_service.grpc_datapath import WireConfig
from store_service.tls import ClientTls, ServerTls

T = wire.to_proto
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _registered_methods() -> list[str]:
    out = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        out += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return out


def test_every_rpc_has_a_role_and_unlisted_ones_are_refused():
    assert set(_registered_methods()) <= set(auth.RPC_ROLES)
    a = auth.Authority(auth.Tokens(admin="a", train="t", read="r"))
    with pytest.raises(errors.PermissionDenied):
        a.check("/knowledge_store.v1.KnowledgeStore/NewFastPath", (("authorization", "Bearer a"),))


def _call(h, method: str):
    """(stub method, an empty request) for a full method name. A server-streaming method
    (FetchStream) is read to its end, so its status arrives as a unary call's would."""
    from protos import knowledge_store_pb2_grpc as pb_grpc
    service, name = method.rsplit("/", 1)
    stub = {"StoreAdmin": h.admin, "KnowledgeStore": h.store,
            "StoreTransport": pb_grpc.StoreTransportStub(h.channel)}[service.rsplit(".", 1)[-1]]
    desc = pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[-1]].methods_by_name[name]
    rpc = getattr(stub, name)
    if desc.server_streaming:
        stream = rpc
        rpc = lambda req, **kw: list(stream(req, **kw))   # noqa: E731
    return rpc, getattr(pb, desc.input_type.name)()


def test_each_rpc_refuses_missing_wrong_and_lower_credentials(hostile):
    h = hostile
    for method in _registered_methods():
        need = auth.RPC_ROLES[method]
        rpc, req = _call(h, method)
        h.expect(rpc, req, UNAUTH, role="")                                   # no token
        before = h.observe()
        with pytest.raises(grpc.RpcError) as info:                           # a token nobody holds
            rpc(req, timeout=10, metadata=(("authorization", "Bearer " + "x" * 43),))
        assert info.value.code() == UNAUTH
        h.assert_unchanged(before)
        for role in ("read", "train"):
            if auth.RANK[role] < auth.RANK[need]:
                h.expect(rpc, req, DENIED, role=role)
        for role in ("read", "train", "admin"):                              # enough: reaches the shard
            if auth.RANK[role] >= auth.RANK[need]:
                try:
                    rpc(req, timeout=10, metadata=h.md(role))
                except grpc.RpcError as err:
                    assert err.code() not in (UNAUTH, DENIED), (method, role, err.details())


def test_no_one_without_the_train_role_changes_rows(hostile):
    """Case 5: reaching the port is not enough to train the table."""
    h = hostile
    grads = pb.AccumulateValueGradsRequest(ids=T(torch.tensor([10])), grads=T(torch.ones(1, h.D_V)))
    end = pb.EndStepRequest(step=0, num_workers=1, timeout_s=5)
    for role, code in (("", UNAUTH), ("read", DENIED)):
        h.expect(h.store.AccumulateValueGrads, grads, code, role=role)
        h.expect(h.store.EndStep, end, code, role=role)
    before = h.shard.state_dict()["values"][10].clone()
    h.store.AccumulateValueGrads(grads, timeout=10, metadata=h.md("train"))
    h.store.EndStep(end, timeout=10, metadata=h.md("train"))
    assert not torch.equal(h.shard.state_dict()["values"][10], before)


def test_refusals_are_counted_in_metrics(hostile):
    h = hostile
    h.expect(h.store.Search, pb.SearchRequest(), UNAUTH, role="")
    assert 'kstore_requests_total{code="UNAUTHENTICATED",method="Search"} 1.0' in h.metrics_text()


def test_tls_with_a_self_signed_certificate(hostile, certs):
    cert, key = certs["server"]
    h = hostile.make("tls", tls=ServerTls.from_files(cert, key))
    shard = RemoteShard(h.server.address, token=h.tokens.read, tls=ClientTls.from_files(cert), retries=0, timeout_s=5,
                        wire_config=WireConfig(channels=3, stream_min_rows=1, split_min_rows=1))
    assert shard.describe().info.num_rows == 356
    ids = torch.arange(300)   # a streamed fetch in 3 parts, one on each channel of the pool: all over TLS
    assert torch.equal(shard.fetch(ids), h.shard.fetch(ids))
    shard.close()
    plain = RemoteShard(h.server.address, token=h.tokens.read, retries=0, timeout_s=2)
    with pytest.raises(errors.ShardUnavailable):
        plain.describe()
    plain.close()
    # a client that trusts another certificate does not connect either
    other = RemoteShard(h.server.address, token=h.tokens.read, tls=ClientTls.from_files(certs["client"][0]),
                        retries=0, timeout_s=2)
    with pytest.raises(errors.ShardUnavailable):
        other.describe()
    other.close()


def test_mutual_tls_needs_a_client_certificate_the_server_trusts(hostile, certs):
    (cert, key), (ccert, ckey) = certs["server"], certs["client"]
    h = hostile.make("mtls", tls=ServerTls.from_files(cert, key, client_ca=ccert))
    good = RemoteShard(h.server.address, token=h.tokens.read, tls=ClientTls.from_files(cert, ccert, ckey),
                       retries=0, timeout_s=5)
    assert good.describe().info.num_rows == 356
    good.close()
    anonymous = RemoteShard(h.server.address, token=h.tokens.read, tls=ClientTls.from_files(cert), retries=0,
                            timeout_s=2)
    with pytest.raises(errors.ShardUnavailable):
        anonymous.describe()
    anonymous.close()


def test_token_files_are_private_and_refused_otherwise(tmp_path):
    path = str(tmp_path / "t" / "tokens.json")
    made = auth.load_or_create_token_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert auth.load_or_create_token_file(path) == made                  # made once, then read
    assert len({made.read, made.train, made.admin}) == 3
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="0600"):
        auth.read_token_file(path)


def test_cluster_config_generates_its_own_tokens(tmp_path):
    a = ClusterConfig(store_root=str(tmp_path / "a")).ensure_tokens()
    b = ClusterConfig(store_root=str(tmp_path / "b")).ensure_tokens()
    assert a.admin_token and b.admin_token and a.admin_token != b.admin_token   # no fixed default
    assert stat.S_IMODE(os.stat(a.token_path()).st_mode) == 0o600
    again = ClusterConfig(store_root=str(tmp_path / "a")).ensure_tokens()
    assert again.admin_token == a.admin_token                                    # clients read it from there
    assert "admin_token" in a.to_dict() and a.to_dict()["admin_token"] == ""     # state files hold no token
    assert ClusterConfig.from_dict(a.to_dict()).ensure_tokens().admin_token == a.admin_token


def test_serve_command_takes_a_token_file_limits_and_tls(tmp_path, certs):
    """`python -m store_service.serve --token-file ... --limit max_k=8 --tls-cert ... --tls-key ...`"""
    from store_service.config import TableConfig
    from store_service.serve import start_shard_process
    from store_service.table import Table
    root = str(tmp_path / "store")
    t = Table.create(TableConfig(d_k=8, d_v=16, segments=[("flat", 40)], num_shards=1), root)
    v = t.snapshot()
    t.close()
    path = str(tmp_path / "tokens.json")
    tokens = auth.load_or_create_token_file(path)
    cert, key = certs["server"]
    proc = start_shard_process(root, v, 0, tokens=tokens, extra_args=[
        "--token-file", path, "--limit", "max_k=8", "--tls-cert", cert, "--tls-key", key])
    try:
        shard = RemoteShard(proc.address, token=tokens.read, tls=ClientTls.from_files(cert), retries=0, timeout_s=10)
        assert shard.search(torch.randn(2, 8), 8).ids.shape == (2, 8)
        with pytest.raises(errors.ResourceExhausted) as info:
            shard.search(torch.randn(2, 8), 9)
        assert info.value.limit == "max_k"
        with pytest.raises(errors.PermissionDenied):
            shard.usage()
        shard.close()
    finally:
        proc.stop()
