"""Search over gRPC as raw bytes (store_service/wire_search.py): bitwise the in-process answer,
ordinary protobuf on the wire both ways, malformed or oversized requests refused with the
right status, and the caller's role checked."""
from __future__ import annotations

import grpc
import pytest
import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, wire, wire_chunks, wire_search
from store_service.client import RemoteShard
from store_service.config import TableConfig
from store_service.interface import SideQuery, TagFilter
from store_service.limits import Limits
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.testing import served_table
from store_service.wire import MD_AUTHORIZATION

TOKEN = "search-token"
D_K = 16


def _cfg(shards: int = 2) -> TableConfig:
    return TableConfig(d_k=D_K, d_v=8, segments=[("product", 12), ("flat", 40)], store_codebooks=True,
                       num_shards=shards, seed=5)


@pytest.fixture
def published(tmp_path):
    root = str(tmp_path)
    return root, Table.create(_cfg(), root).snapshot()


@pytest.mark.parametrize("want_keys", [False, True])
def test_remote_search_is_bitwise_the_in_process_one(published, want_keys):
    root, v = published
    local = Table.open(root, v)
    q = torch.randn(300, D_K, generator=torch.Generator().manual_seed(1))
    with served_table(root, v) as remote:
        for k in (1, 7, 32):
            a, b = local.search(q, k, want_keys=want_keys), remote.search(q, k, want_keys=want_keys)
            assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
            assert (b.keys is None) == (not want_keys)
            if want_keys:
                assert torch.equal(a.keys, b.keys)
        # A non-contiguous view of an odd number of rows travels as its contiguous copy (the
        # in-process matmul over the view itself may sum in another order).
        qt = torch.randn(D_K, 33).T
        a, b = local.search(qt.contiguous(), 5), remote.search(qt, 5)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_request_bytes_are_an_ordinary_search_request_and_split_in_place():
    q = torch.randn(5, D_K)
    raw = wire_search.encode_search_request(q, 3, ("topic",), TagFilter("topic", (1, 2)), SideQuery(1, 2), 4, True)
    msg = pb.SearchRequest.FromString(raw)   # any protobuf reader
    assert msg.k == 3 and msg.version == 4 and msg.want_keys and list(msg.tags) == ["topic"]
    assert msg.side.partition == 1 and msg.where.name == "topic"
    assert torch.equal(wire.from_proto(msg.queries, "queries"), q)
    header, at = wire_search.split_search_request(raw)
    assert list(header.queries.shape) == [5, D_K] and header.queries.data == b""
    assert at is not None and at[0] is raw
    queries, options = wire_search.search_request_from_split(header, at)
    assert torch.equal(queries, q) and options["want_keys"] and options["side"] == SideQuery(1, 2)
    # A protobuf-encoded message splits the same (and the last data of a repeated field wins,
    # as protobuf reads it).
    twice = pb.SearchRequest(k=3, queries=wire.to_proto(q * 0)).SerializeToString() + \
        pb.SearchRequest(queries=pb.Tensor(data=wire.to_proto(q).data)).SerializeToString()
    h2, at2 = wire_search.split_search_request(twice)
    assert torch.equal(wire_search.search_request_from_split(h2, at2)[0], q)
    assert torch.equal(wire.from_proto(pb.SearchRequest.FromString(twice).queries, "q"), q)


def test_answer_bytes_round_trip_and_are_an_ordinary_search_response(published):
    root, v = published
    shard = Shard.load(root, v, 0)
    res = shard.search(torch.randn(9, D_K), 4, want_keys=True)
    raw = wire_search.encode_search_result(res)
    msg = pb.SearchResponse.FromString(raw)
    assert msg.ids.dtype == "int32"   # ids fit: half the bytes
    assert torch.equal(wire.from_proto(msg.ids, "ids", ids=True), res.ids)
    back = wire_search.decode_search_result(raw, (), False)
    assert torch.equal(back.ids, res.ids) and torch.equal(back.scores, res.scores) and torch.equal(back.keys, res.keys)


@pytest.mark.parametrize("raw", [b"\x12\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x0f", b"\x12\x03\x1a\x09x"])
def test_malformed_bytes_are_refused_naming_the_request(raw):
    with pytest.raises(errors.InvalidArgument) as info:
        wire_search.split_search_request(raw)
    assert info.value.field == "request"


@pytest.fixture
def server(published):
    root, v = published
    srv = serve_shard(Shard.load(root, v, 0), admin_token=TOKEN, limits=Limits(max_queries=64))
    try:
        yield srv
    finally:
        srv.stop(grace=None)


def _raw_search(address: str, raw: bytes, token: str = TOKEN):
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary("/knowledge_store.v1.KnowledgeStore/Search", request_serializer=None,
                              response_deserializer=None)
        md = ((MD_AUTHORIZATION, wire.bearer(token)),) if token else ()
        return call(raw, timeout=10, metadata=md)


def test_server_refuses_bad_bytes_oversize_and_unauthenticated_calls(server):
    with pytest.raises(grpc.RpcError) as info:
        _raw_search(server.address, b"\x12\x05ab")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request" in info.value.details()
    over = wire_search.encode_search_request(torch.randn(65, D_K), 3, (), None, None, 0)
    with pytest.raises(grpc.RpcError) as info:
        _raw_search(server.address, over)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bad_rank = wire_search.encode_search_request(torch.randn(2, 3, D_K), 3, (), None, None, 0)
    with pytest.raises(grpc.RpcError) as info:
        _raw_search(server.address, bad_rank)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "queries" in info.value.details()
    ok = wire_search.encode_search_request(torch.randn(4, D_K), 3, (), None, None, 0)
    with pytest.raises(grpc.RpcError) as info:
        _raw_search(server.address, ok, token="")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        _raw_search(server.address, ok, token="wrong")
    assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_a_protobuf_client_gets_the_same_answer_as_the_raw_one(server, published):
    root, v = published
    q = torch.randn(20, D_K)
    stub = pb_grpc.KnowledgeStoreStub(grpc.insecure_channel(server.address))
    md = ((MD_AUTHORIZATION, wire.bearer(TOKEN)),)
    old = stub.Search(wire.search_request_to_proto(q, 6, (), None, None, 0), metadata=md, timeout=10)
    old = wire.search_result_from_proto(old, (), False)
    shard = RemoteShard(server.address, admin_token=TOKEN, timeout_s=10)
    try:
        new = shard.search(q, 6)
    finally:
        shard.close()
    expect = Shard.load(root, v, 0).search(q, 6)
    for r in (old, new):
        assert torch.equal(r.ids, expect.ids) and torch.equal(r.scores, expect.scores)


def test_a_malformed_answer_is_the_shards_fault_not_the_callers():
    with pytest.raises(errors.InvalidArgument) as info:
        wire_search.decode_search_result(b"\x0a\x05ab", (), False)
    assert info.value.field == "answer"
    _ = wire_chunks   # the splitter is wire_chunks'; its tensor checks are tested in test_datapath
