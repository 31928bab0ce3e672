"""Over real gRPC: auth, bad input, health, reflection, metrics, retries and failure reporting.

Each bad request is sent with the raw generated stubs (so the status code and
message are what any gRPC client sees) and must leave the shard unchanged.
"""
from __future__ import annotations

import socket
import threading
import time
import urllib.request
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, wire
from store_service.client import RemoteShard
from store_service.config import OptimizerConfig, TableConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
D_K, D_V = 8, 16


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One shard (the whole table: 6^2 product rows + 40 flat rows) behind a server
    with a 1 MB message limit and a metrics endpoint."""
    root = str(tmp_path_factory.mktemp("store"))
    cfg = TableConfig(d_k=D_K, d_v=D_V, segments=[("product", 6), ("flat", 40)], store_codebooks=True,
                      num_shards=1, optimizer=OptimizerConfig("adam", lr=0.1))
    version = Table.create(cfg, root).snapshot()
    shard = Shard.load(root, version, 0)
    server = serve_shard(shard, admin_token=TOKEN, metrics_port=0, max_message_mb=1)
    channel = grpc.insecure_channel(server.address)
    yield dict(root=root, version=version, shard=shard, server=server, channel=channel,
               store=pb_grpc.KnowledgeStoreStub(channel), admin=pb_grpc.StoreAdminStub(channel))
    channel.close()
    server.stop(grace=None)


def _snapshot(shard: Shard) -> dict:
    """Everything observable about the shard, to check that a refused call changed nothing."""
    d = shard.describe()
    return dict(describe=d, versions=shard.held_versions(), state=shard.state_dict())


def _assert_unchanged(shard: Shard, before: dict) -> None:
    after = _snapshot(shard)
    assert after["describe"] == before["describe"]
    assert after["versions"] == before["versions"]
    assert after["state"].keys() == before["state"].keys()
    for name, t in before["state"].items():
        assert torch.equal(after["state"][name], t), name
    # Nothing was accumulated either: a step now would not move any value or key.
    st = shard._serving
    assert not st.row_grads and not st.key_grads and not bool(st.step_hits.any())


def _t(x: torch.Tensor) -> pb.Tensor:
    return wire.to_proto(x)


def _expect(env, rpc, request, code, field=None, metadata=AUTH):
    before = _snapshot(env["shard"])
    with pytest.raises(grpc.RpcError) as info:
        rpc(request, timeout=10, metadata=metadata)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    if field is not None:
        assert err.details().startswith(f"{field}:") or field in err.details(), err.details()
        assert dict(err.trailing_metadata())["ks-field"] == field
    _assert_unchanged(env["shard"], before)
    return err


# -- auth --------------------------------------------------------------------------

def _admin_calls(env):
    a, ids = env["admin"], _t(torch.tensor([1, 2]))
    return [
        (a.Describe, pb.DescribeRequest()),
        (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)))),
        (a.SetFrozen, pb.SetFlagRequest(ids=ids, value=True)),
        (a.SetAblated, pb.SetFlagRequest(ids=ids, value=True)),
        (a.SetOptimizer, pb.SetOptimizerRequest(optimizer=pb.OptimizerSettings(kind="sgd", lr=0.5))),
        (a.Usage, pb.UsageRequest()),
        (a.WriteSnapshot, pb.WriteSnapshotRequest(version_dir=env["root"] + "/x", version=9)),
        (a.PrepareVersion, pb.PrepareVersionRequest(store_root=env["root"], version=env["version"])),
        (a.FlipVersion, pb.FlipVersionRequest(version=env["version"])),
        (a.ReleaseVersion, pb.ReleaseVersionRequest(version=env["version"])),
    ]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)],
                         ids=["no-token", "wrong-token", "no-bearer"])
def test_admin_without_valid_token_is_unauthenticated_and_changes_nothing(env, metadata):
    for rpc, request in _admin_calls(env):
        err = _expect(env, rpc, request, grpc.StatusCode.UNAUTHENTICATED, metadata=metadata)
        assert "Bearer" in err.details() or "token" in err.details()


def test_client_maps_unauthenticated(env):
    shard = RemoteShard(env["server"].address, admin_token="wrong", retries=0)
    before = _snapshot(env["shard"])
    with pytest.raises(errors.Unauthenticated):
        shard.add_rows(torch.zeros(1, D_V), torch.zeros(1, D_K))
    with pytest.raises(errors.Unauthenticated):
        RemoteShard(env["server"].address).set_ablated(torch.tensor([0]), True)
    _assert_unchanged(env["shard"], before)
    shard.close()


# -- bad input ------------------------------------------------------------------------

IA = grpc.StatusCode.INVALID_ARGUMENT
NAN_Q = torch.randn(3, D_K)
NAN_Q[1, 2] = float("nan")
INF_W = torch.rand(2, 3)
INF_W[0, 0] = float("inf")
IDS = torch.tensor([[0, 5, 40], [1, -1, 70]])
W = torch.rand(2, 3)


def _bad_requests(env):
    s, a = _Names("store"), _Names("admin")
    q = torch.randn(3, D_K)
    return {
        # name: (rpc, request, code, field)
        "search-wrong-dims": (s.Search, pb.SearchRequest(queries=_t(torch.randn(3, D_K + 1)), k=4), IA, "queries"),
        "search-wrong-rank": (s.Search, pb.SearchRequest(queries=_t(torch.randn(3, 2, D_K)), k=4), IA, "queries"),
        "search-wrong-dtype": (s.Search, pb.SearchRequest(queries=_t(q.double()), k=4), IA, "queries"),
        "search-unknown-dtype": (s.Search, pb.SearchRequest(
            queries=pb.Tensor(dtype="float8", shape=[3, D_K], data=b"\0" * 3 * D_K), k=4), IA, "queries"),
        "search-bytes-vs-shape": (s.Search, pb.SearchRequest(
            queries=pb.Tensor(dtype="float32", shape=[3, D_K], data=b"\0" * 7), k=4), IA, "queries"),
        "search-missing-tensor": (s.Search, pb.SearchRequest(k=4), IA, "queries"),
        "search-nan": (s.Search, pb.SearchRequest(queries=_t(NAN_Q), k=4), IA, "queries"),
        "search-empty-batch": (s.Search, pb.SearchRequest(queries=_t(torch.zeros(0, D_K)), k=4), IA, "queries"),
        "search-k-above-rows": (s.Search, pb.SearchRequest(queries=_t(q), k=77), IA, "k"),
        "search-k-zero": (s.Search, pb.SearchRequest(queries=_t(q), k=0), IA, "k"),
        "fetch-out-of-range": (s.Fetch, pb.FetchRequest(ids=_t(torch.tensor([0, 76]))), IA, "ids"),
        "fetch-negative": (s.Fetch, pb.FetchRequest(ids=_t(torch.tensor([-2]))), IA, "ids"),
        "fetch-float-ids": (s.Fetch, pb.FetchRequest(ids=_t(torch.tensor([0.0, 1.0]))), IA, "ids"),
        "fetch-empty": (s.Fetch, pb.FetchRequest(ids=_t(torch.zeros(0, dtype=torch.int64))), IA, "ids"),
        "readout-ids-out-of-range": (s.Readout, pb.ReadoutRequest(
            ids=_t(torch.tensor([[0, 500, 1], [1, 2, 3]])), weights=_t(W)), IA, "ids"),
        "readout-weights-shape": (s.Readout, pb.ReadoutRequest(ids=_t(IDS), weights=_t(torch.rand(2, 4))),
                                  IA, "weights"),
        "readout-weights-inf": (s.Readout, pb.ReadoutRequest(ids=_t(IDS), weights=_t(INF_W)), IA, "weights"),
        "readout-weights-bf16": (s.Readout, pb.ReadoutRequest(ids=_t(IDS), weights=_t(W.bfloat16())),
                                 IA, "weights"),
        "readout-slots-bits-length": (s.Readout, pb.ReadoutRequest(
            slots=pb.SlotMask(rows=2, cols=3, bits=b"\x07\x00"), ids=_t(torch.tensor([0, 5, 40])),
            weights=_t(torch.rand(3))), IA, "slots"),
        "readout-slots-padding-bit": (s.Readout, pb.ReadoutRequest(
            slots=pb.SlotMask(rows=2, cols=3, bits=bytes([0b11000111])), ids=_t(torch.tensor([0, 5, 40])),
            weights=_t(torch.rand(3))), IA, "slots"),
        "readout-slots-fewer-ids": (s.Readout, pb.ReadoutRequest(
            slots=pb.SlotMask(rows=2, cols=3, bits=bytes([0b00000111])), ids=_t(torch.tensor([0, 5])),
            weights=_t(torch.rand(3))), IA, "ids"),
        "readout-slots-more-weights": (s.Readout, pb.ReadoutRequest(
            slots=pb.SlotMask(rows=2, cols=3, bits=bytes([0b00000111])), ids=_t(torch.tensor([0, 5, 40])),
            weights=_t(torch.rand(4))), IA, "weights"),
        "readout-slots-grid-ids": (s.Readout, pb.ReadoutRequest(
            slots=pb.SlotMask(rows=2, cols=3, bits=bytes([0b00111111])), ids=_t(IDS), weights=_t(W)), IA, "ids"),
        "readout-out-dtype": (s.Readout, pb.ReadoutRequest(ids=_t(IDS), weights=_t(W), out_dtype="float16"),
                              IA, "out_dtype"),
        "backward-slots-fewer-ids": (s.ReadoutBackward, pb.ReadoutBackwardRequest(
            slots=pb.SlotMask(rows=2, cols=3, bits=bytes([0b00000111])), ids=_t(torch.tensor([0, 5])),
            weights=_t(torch.rand(3)), grad_out=_t(torch.zeros(2, D_V))), IA, "ids"),
        "backward-grad-float64": (s.ReadoutBackward, pb.ReadoutBackwardRequest(
            ids=_t(IDS), weights=_t(W), grad_out=_t(torch.zeros(2, D_V, dtype=torch.float64))), IA, "grad_out"),
        "backward-grad-nan": (s.ReadoutBackward, pb.ReadoutBackwardRequest(
            ids=_t(IDS), weights=_t(W), grad_out=_t(torch.full((2, D_V), float("nan")))), IA, "grad_out"),
        "backward-grad-dims": (s.ReadoutBackward, pb.ReadoutBackwardRequest(
            ids=_t(IDS), weights=_t(W), grad_out=_t(torch.zeros(2, D_V + 1))), IA, "grad_out"),
        "key-grads-product-row": (s.AccumulateKeyGrads, pb.AccumulateKeyGradsRequest(
            ids=_t(torch.tensor([3])), grads=_t(torch.zeros(1, D_K))), IA, "ids"),
        "key-grads-shape": (s.AccumulateKeyGrads, pb.AccumulateKeyGradsRequest(
            ids=_t(torch.tensor([40])), grads=_t(torch.zeros(2, D_K))), IA, "grads"),
        "fetch-usage-length": (s.Fetch, pb.FetchRequest(
            ids=_t(torch.tensor([0, 1])), hits=_t(torch.ones(3, dtype=torch.int64)),
            weight_sum=_t(torch.ones(2, dtype=torch.float64))), IA, "hits"),
        "fetch-usage-negative-hits": (s.Fetch, pb.FetchRequest(
            ids=_t(torch.tensor([0])), hits=_t(torch.tensor([-3])), weight_sum=_t(torch.ones(1, dtype=torch.float64))),
            IA, "hits"),
        "fetch-usage-float-hits": (s.Fetch, pb.FetchRequest(
            ids=_t(torch.tensor([0])), hits=_t(torch.ones(1)), weight_sum=_t(torch.ones(1, dtype=torch.float64))),
            IA, "hits"),
        "fetch-usage-missing-weights": (s.Fetch, pb.FetchRequest(
            ids=_t(torch.tensor([0])), hits=_t(torch.ones(1, dtype=torch.int64))), IA, "weight_sum"),
        "fetch-usage-nan-weights": (s.Fetch, pb.FetchRequest(
            ids=_t(torch.tensor([0])), hits=_t(torch.ones(1, dtype=torch.int64)),
            weight_sum=_t(torch.tensor([float("nan")], dtype=torch.float64))), IA, "weight_sum"),
        "value-grads-dims": (s.AccumulateValueGrads, pb.AccumulateValueGradsRequest(
            ids=_t(torch.tensor([0, 1])), grads=_t(torch.zeros(2, D_V + 1))), IA, "grads"),
        "value-grads-nan": (s.AccumulateValueGrads, pb.AccumulateValueGradsRequest(
            ids=_t(torch.tensor([0])), grads=_t(torch.full((1, D_V), float("nan")))), IA, "grads"),
        "value-grads-float64": (s.AccumulateValueGrads, pb.AccumulateValueGradsRequest(
            ids=_t(torch.tensor([0])), grads=_t(torch.zeros(1, D_V, dtype=torch.float64))), IA, "grads"),
        "value-grads-out-of-range": (s.AccumulateValueGrads, pb.AccumulateValueGradsRequest(
            ids=_t(torch.tensor([76])), grads=_t(torch.zeros(1, D_V))), IA, "ids"),
        "fetch-out-dtype": (s.Fetch, pb.FetchRequest(ids=_t(torch.tensor([0])), out_dtype="int8"), IA, "out_dtype"),
        "end-step-future": (s.EndStep, pb.EndStepRequest(step=5, num_workers=1, timeout_s=5), IA, "step"),
        "end-step-worker": (s.EndStep, pb.EndStepRequest(step=0, worker=3, num_workers=2, timeout_s=5), IA, "worker"),
        "add-rows-nan": (a.AddRows, pb.AddRowsRequest(values=_t(torch.full((2, D_V), float("nan"))),
                                                      keys=_t(torch.zeros(2, D_K))), IA, "values"),
        "add-rows-bias-shape": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)),
                                                             bias=_t(torch.zeros(3))), IA, "bias"),
        "add-rows-bias-nan": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)),
                                                           bias=_t(torch.tensor([0.0, float("nan")]))), IA, "bias"),
        "add-rows-key-dims": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)),
                                                           keys=_t(torch.zeros(2, D_K - 1))), IA, "keys"),
        "add-rows-empty": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(0, D_V)),
                                                        keys=_t(torch.zeros(0, D_K))), IA, "values"),
        "freeze-out-of-range": (a.SetFrozen, pb.SetFlagRequest(ids=_t(torch.tensor([1, 99])), value=True),
                                IA, "ids"),
        "ablate-padding-id": (a.SetAblated, pb.SetFlagRequest(ids=_t(torch.tensor([-1])), value=True), IA, "ids"),
        "search-unknown-version": (s.Search, pb.SearchRequest(version=99, queries=_t(q), k=4),
                                   grpc.StatusCode.FAILED_PRECONDITION, None),
        "prepare-unknown-version": (a.PrepareVersion, pb.PrepareVersionRequest(store_root="", version=99),
                                    grpc.StatusCode.NOT_FOUND, None),
        "flip-unprepared-version": (a.FlipVersion, pb.FlipVersionRequest(version=99),
                                    grpc.StatusCode.NOT_FOUND, None),
        "search-negative-version": (s.Search, pb.SearchRequest(version=-1, queries=_t(q), k=4), IA, "version"),
        "search-bad-tag-name": (s.Search, pb.SearchRequest(queries=_t(q), k=4, tags=["Topic"]), IA, "tags"),
        "search-repeated-tag": (s.Search, pb.SearchRequest(queries=_t(q), k=4, tags=["a", "a"]), IA, "tags"),
        "search-filter-name": (s.Search, pb.SearchRequest(queries=_t(q), k=4, where=pb.TagFilter(name="")),
                               IA, "where.name"),
        "search-filter-negative-value": (s.Search, pb.SearchRequest(
            queries=_t(q), k=4, where=pb.TagFilter(name="a", values=_t(torch.tensor([3, -1])))), IA, "where.values"),
        "search-filter-float-values": (s.Search, pb.SearchRequest(
            queries=_t(q), k=4, where=pb.TagFilter(name="a", values=_t(torch.tensor([3.0])))), IA, "where.values"),
        "search-side-partition-0": (s.Search, pb.SearchRequest(queries=_t(q), k=4, side=pb.SideQuery(partition=0, k=2)),
                                    IA, "side.partition"),
        "search-side-k-0": (s.Search, pb.SearchRequest(queries=_t(q), k=4, side=pb.SideQuery(partition=1, k=0)),
                            IA, "side.k"),
        "search-side-k-above-rows": (s.Search, pb.SearchRequest(queries=_t(q), k=4,
                                                                side=pb.SideQuery(partition=1, k=77)), IA, "side.k"),
        "add-rows-tag-name": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)),
                                                           tags={"9lives": _t(torch.zeros(2, dtype=torch.int64))}),
                              IA, "tags"),
        "add-rows-tag-dtype": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)),
                                                            tags={"topic": _t(torch.zeros(2, dtype=torch.int32))}),
                               IA, "tags[topic]"),
        "add-rows-tag-shape": (a.AddRows, pb.AddRowsRequest(values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)),
                                                            tags={"topic": _t(torch.zeros(3, dtype=torch.int64))}),
                               IA, "tags[topic]"),
        "add-rows-tag-below-unset": (a.AddRows, pb.AddRowsRequest(
            values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)),
            tags={"topic": _t(torch.tensor([0, -2]))}), IA, "tags[topic]"),
        "add-rows-negative-partition": (a.AddRows, pb.AddRowsRequest(
            values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)), partition=_t(torch.tensor([0, -1]))),
            IA, "partition"),
        "add-rows-partition-shape": (a.AddRows, pb.AddRowsRequest(
            values=_t(torch.zeros(2, D_V)), keys=_t(torch.zeros(2, D_K)), partition=_t(torch.tensor([1]))),
            IA, "partition"),
        "set-optimizer-kind": (a.SetOptimizer, pb.SetOptimizerRequest(
            optimizer=pb.OptimizerSettings(kind="rmsprop", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)),
            IA, "optimizer.kind"),
        "set-optimizer-lr": (a.SetOptimizer, pb.SetOptimizerRequest(
            optimizer=pb.OptimizerSettings(kind="sgd", lr=float("nan"), beta1=0.9, beta2=0.99, eps=1e-8)),
            IA, "optimizer.lr"),
        "set-optimizer-eps": (a.SetOptimizer, pb.SetOptimizerRequest(
            optimizer=pb.OptimizerSettings(kind="adam", lr=0.1, beta1=0.9, beta2=0.99, eps=0.0)), IA, "optimizer.eps"),
        "set-optimizer-bias-step": (a.SetOptimizer, pb.SetOptimizerRequest(
            optimizer=pb.OptimizerSettings(kind="sgd", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8), bias_step=-1.0),
            IA, "bias_step"),
    }


class _Names:
    """Stands for a stub while the table of bad requests is built: s.Search -> ("store", "Search")."""

    def __init__(self, service: str):
        self.service = service

    def __getattr__(self, method: str) -> tuple[str, str]:
        return self.service, method


BAD = list(_bad_requests(dict(root="", version=1)).keys())


@pytest.mark.parametrize("name", BAD)
def test_bad_input_names_the_field_and_changes_nothing(env, name):
    (service, method), request, code, field = _bad_requests(env)[name]
    err = _expect(env, getattr(env[service], method), request, code, field)
    if name == "search-unknown-version":
        md = dict(err.trailing_metadata())
        assert md["ks-error"] == "stale-version"
        assert md["ks-serving-version"] == str(env["version"]) and str(env["version"]) in err.details()


def test_oversized_message_is_refused_before_the_shard(env):
    big = torch.randn(40_000, D_K)  # 1.3 MB > the server's 1 MB limit
    err = _expect(env, env["store"].Search, pb.SearchRequest(queries=_t(big), k=4),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "larger than max" in err.details()
    shard = RemoteShard(env["server"].address, admin_token=TOKEN, retries=0)
    with pytest.raises(errors.ResourceExhausted) as info:
        shard.search(big, 4)
    assert info.value.limit == "max_message_mb" and "larger than max" in str(info.value)
    shard.close()


def test_client_maps_codes_back_to_domain_errors(env):
    shard = RemoteShard(env["server"].address, admin_token=TOKEN, retries=0, store_root=env["root"])
    with pytest.raises(errors.InvalidArgument) as info:
        shard.search(NAN_Q, 4)
    assert info.value.field == "queries" and "NaN" in str(info.value)
    with pytest.raises(errors.StaleVersion) as stale:
        shard.fetch(torch.tensor([1]), version=42)
    assert (stale.value.requested, stale.value.serving) == (42, env["version"])
    with pytest.raises(errors.NotFound):
        shard.prepare_version(env["root"], 42)
    shard.close()


def test_failed_precondition_round_trips():
    cfg = TableConfig(d_k=D_K, d_v=D_V, segments=[("flat", 10)], num_shards=2)
    with serve_shard(Shard(cfg, 0), admin_token=TOKEN) as server:
        first = RemoteShard(server.address, admin_token=TOKEN, retries=0)
        with pytest.raises(errors.FailedPrecondition, match="not the table's last rows"):
            first.add_rows(torch.zeros(1, D_V), torch.zeros(1, D_K))  # only the last shard may append
        assert first.describe().info.row_end == 5
        first.close()


# -- retries, failures ----------------------------------------------------------------

def test_retried_add_rows_is_applied_once(tmp_path):
    cfg = TableConfig(d_k=D_K, d_v=D_V, segments=[("flat", 10)], num_shards=1)
    with serve_shard(Shard(cfg), admin_token=TOKEN) as server, grpc.insecure_channel(server.address) as ch:
        admin = pb_grpc.StoreAdminStub(ch)
        req = pb.AddRowsRequest(request_id=uuid.uuid4().hex, values=_t(torch.ones(2, D_V)),
                                keys=_t(torch.ones(2, D_K)))
        first = wire.from_proto(admin.AddRows(req, metadata=AUTH).ids, "ids", ids=True)
        again = wire.from_proto(admin.AddRows(req, metadata=AUTH).ids, "ids", ids=True)
        assert torch.equal(first, torch.tensor([10, 11])) and torch.equal(first, again)
        assert RemoteShard(server.address, token=TOKEN).describe().info.row_end == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_is_retried_until_the_server_is_up():
    cfg = TableConfig(d_k=D_K, d_v=D_V, segments=[("flat", 10)], num_shards=1)
    port = _free_port()
    started = []
    timer = threading.Timer(0.6, lambda: started.append(serve_shard(Shard(cfg), port, admin_token=TOKEN)))
    timer.start()
    try:
        shard = RemoteShard(f"127.0.0.1:{port}", token=TOKEN, timeout_s=15, retries=12, backoff_s=0.05)
        assert shard.fetch(torch.tensor([3])).shape == (1, D_V)
        shard.close()
    finally:
        timer.join()
        for s in started:
            s.stop(grace=None)


def test_unreachable_shard_raises_shard_unavailable_naming_it():
    address = f"127.0.0.1:{_free_port()}"
    shard = RemoteShard(address, timeout_s=1.0, retries=3, shard_id=7)
    t0 = time.monotonic()
    with pytest.raises(errors.ShardUnavailable) as info:
        shard.search(torch.randn(2, D_K), 2)
    assert time.monotonic() - t0 < 5
    assert info.value.shard_id == 7 and info.value.address == address
    assert "shard 7" in str(info.value) and address in str(info.value)
    assert not shard.health()
    shard.close()


# -- health, reflection, metrics ------------------------------------------------------

def test_health_service_reports_serving(env):
    stub = health_pb2_grpc.HealthStub(env["channel"])
    for service in ("", wire.STORE_SERVICE, wire.ADMIN_SERVICE):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert RemoteShard(env["server"].address).health()


def test_reflection_lists_and_describes_the_services(env):
    stub = reflection_pb2_grpc.ServerReflectionStub(env["channel"])
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=wire.STORE_SERVICE)]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {wire.STORE_SERVICE, wire.ADMIN_SERVICE, "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # grpcurl can build requests from it


def test_metrics_endpoint_serves_counters(env):
    store = env["store"]
    store.Search(pb.SearchRequest(queries=_t(torch.randn(4, D_K)), k=3), timeout=5, metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        store.Search(pb.SearchRequest(queries=_t(NAN_Q), k=3), timeout=5, metadata=AUTH)
    port = env["server"].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kstore_requests_total{code="OK",method="Search"}' in text
    assert 'kstore_requests_total{code="INVALID_ARGUMENT",method="Search"}' in text
    assert 'kstore_request_seconds_bucket{le="0.005",method="Search"}' in text
    assert 'kstore_request_items_total{method="Search"}' in text
    assert 'kstore_rows{shard="0"} 76.0' in text
    assert f'kstore_version{{shard="0"}} {float(env["version"])}' in text
    assert "kstore_usage_fraction_used" in text and "kstore_frozen_rows" in text


def _server_cmd(root: str, version: int, *extra: str) -> list[str]:
    import sys
    return [sys.executable, "-m", "store_service.serve", "--store-root", root, "--version", str(version),
            "--shard", "0", "--port", "0", *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error path needs a machine without CUDA")
def test_server_refuses_a_device_it_does_not_have_with_one_clear_line(env):
    import os
    import subprocess
    proc = subprocess.run(_server_cmd(env["root"], env["version"], "--device", "cuda"), capture_output=True,
                          text=True, timeout=120, env={**os.environ, "KSTORE_ADMIN_TOKEN": TOKEN})
    assert proc.returncode == 2
    assert "cannot serve version" in proc.stderr and "CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_server_device_overrides_the_published_device(tmp_path):
    """A table published from GPU memory, served from host memory (`--device cpu`):
    the same answers as the GPU table."""
    from store_service.client import connect
    from store_service.serve import start_shard_process
    cfg = TableConfig(d_k=D_K, d_v=D_V, segments=[("flat", 40)], num_shards=1, device="cuda")
    gpu = Table.create(cfg, str(tmp_path))
    version = gpu.snapshot()
    proc = start_shard_process(str(tmp_path), version, 0, admin_token=TOKEN, extra_args=["--device", "cpu"])
    try:
        remote = connect([proc.address], admin_token=TOKEN)
        ids = torch.randint(0, 40, (5, 3))
        w = torch.rand(5, 3)
        torch.testing.assert_close(remote.readout(ids, w), gpu.readout(ids.cuda(), w.cuda()).cpu())
        remote.close()
        for s in remote.shards:
            s.close()
    finally:
        proc.stop()
