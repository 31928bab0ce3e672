"""The data path: streamed gRPC fetches over a channel pool, pieces of row gradients and
readouts, raw FetchChunk bytes, and the transport seam (selection, fallback, errors), each
against the in-process table; every registered transport too."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from protos import knowledge_store_pb2 as pb
from store_service import datapath, errors, wire
from store_service.client import connect
from store_service.config import OptimizerConfig, TableConfig
from store_service.grpc_datapath import WireConfig, split
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.wire_chunks import decode_chunk, encode_chunk

TOKEN = "datapath-token"
# Tiny limits, so that even a few rows are split over channels and streamed in pieces.
SMALL = WireConfig(channels=3, stream_min_rows=1, split_min_rows=7, chunk_rows=5, grad_chunk_rows=9)


def _config() -> TableConfig:
    return TableConfig(d_k=8, d_v=12, segments=[("flat", 90)], num_shards=2, value_dtype="bfloat16",
                       seed=5, optimizer=OptimizerConfig("sgd", lr=0.5))


@pytest.fixture
def pair(tmp_path):
    """(in-process table, remote table over 2 loopback servers, the servers)."""
    root = str(tmp_path)
    version = Table.create(_config(), root).snapshot()
    servers = [serve_shard(Shard.load(root, version, i), admin_token=TOKEN) for i in range(2)]
    remote = connect([s.address for s in servers], admin_token=TOKEN, store_root=root, timeout_s=10,
                     wire_config=SMALL, retries=1)
    try:
        yield Table.open(root, version), remote, servers
    finally:
        for s in remote.shards:
            s.close()
        for s in servers:
            s.stop(grace=None)


def test_split_covers_every_row_once():
    for rows in (1, 5, 64, 100):
        for parts in (1, 3, 7, 200):
            got = torch.cat([torch.arange(rows)[s] for s in split(rows, parts)])
            assert torch.equal(got, torch.arange(rows))


def test_chunk_bytes_are_a_fetch_chunk_and_decode_as_a_view():
    t = torch.randn(7, 5).to(torch.bfloat16)
    raw = encode_chunk(11, t)
    msg = pb.FetchChunk.FromString(raw)               # any protobuf reader sees the same message
    assert msg.row_start == 11 and torch.equal(wire.from_proto(msg.values, "values"), t)
    start, back = decode_chunk(raw)
    assert start == 11 and back.dtype == torch.bfloat16 and torch.equal(back, t)
    # A protobuf-encoded chunk decodes too, and a size that does not match is refused.
    assert torch.equal(decode_chunk(pb.FetchChunk(row_start=2, values=wire.to_proto(t)).SerializeToString())[1], t)
    bad = pb.FetchChunk(values=pb.Tensor(dtype="bfloat16", shape=[7, 6], data=raw[-70:])).SerializeToString()
    with pytest.raises(errors.InvalidArgument, match="do not match"):
        decode_chunk(bad)
    with pytest.raises(errors.InvalidArgument):
        decode_chunk(raw[:-3])


def test_streamed_fetch_over_the_channel_pool_equals_in_process(pair):
    local, remote, _ = pair
    g = torch.Generator().manual_seed(0)
    for rows in (1, 6, 40, 250):
        ids = torch.randint(-1, 90, (rows,), generator=g)
        want, got = local.fetch(ids), remote.fetch(ids)
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    ids = torch.randperm(90, generator=g)[:60]
    hits = torch.randint(1, 4, (60,), generator=g)
    wsum = torch.rand(60, generator=g, dtype=torch.float64)
    assert torch.equal(local.fetch(ids, hits=hits, weight_sum=wsum), remote.fetch(ids, hits=hits, weight_sum=wsum))
    lu, ru = local.usage(), remote.usage()
    assert torch.equal(lu.hits, ru.hits) and torch.equal(lu.weight_sum, ru.weight_sum)


def test_gradients_in_pieces_and_readouts_equal_in_process(pair):
    local, remote, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(90, generator=g)[:50]
    grads = torch.randn(50, 12, generator=g)
    for t in (local, remote):
        t.accumulate_value_grads(ids, grads, request_id="step0")
        t.accumulate_value_grads(ids, grads, request_id="step0")   # a replay is applied once
        t.flush()
        t.end_step(0)
    every = torch.arange(90)
    assert torch.equal(local.fetch(every), remote.fetch(every))
    sel = torch.randint(-1, 90, (33, 4), generator=g)
    w = torch.softmax(torch.randn(33, 4, generator=g), -1)
    assert torch.equal(local.readout(sel, w), remote.readout(sel, w))


def test_a_dead_server_is_shard_unavailable_on_the_streamed_path(pair):
    _, remote, servers = pair
    servers[1].stop(grace=None)
    with pytest.raises(errors.ShardUnavailable):
        remote.fetch(torch.arange(90))


# -- the transport seam ----------------------------------------------------------------

_TICKETS: dict[str, Shard] = {}


class _InProcessPath:
    """A transport for a client in the server's own process: calls the shard directly,
    carrying errors as a real transport must (error_to_wire / error_from_wire)."""
    kind = "test_inprocess"

    def __init__(self, shard, shard_id, address):
        self._shard, self._id, self._address = shard, shard_id, address

    def _do(self, fn):
        try:
            return fn()
        except Exception as exc:
            raise datapath.error_from_wire(datapath.error_to_wire(exc), self._id, self._address) from None

    def fetch(self, ids, *, hits=None, weight_sum=None, out_dtype=None, version=0):
        return self._do(lambda: self._shard.fetch(ids, hits=hits, weight_sum=weight_sum, version=version))

    def readout(self, ids, weights, *, out_dtype=torch.float32, version=0):
        return self._do(lambda: self._shard.readout(ids, weights, version=version).to(out_dtype))

    def accumulate_value_grads(self, ids, grads, *, request_id, version=0):
        self._do(lambda: self._shard.accumulate_value_grads(ids, grads.float(), request_id=request_id,
                                                            version=version))

    def readout_backward(self, ids, weights, grad_out, *, request_id, version=0):
        return self._do(lambda: self._shard.readout_backward(ids, weights, grad_out.float(), request_id=request_id,
                                                             version=version))

    def close(self):
        pass


class _Server:
    kind = "test_inprocess"

    def __init__(self, shard):
        self.shard = shard

    def open(self, client, server, params):
        if client.pid != server.pid or params.get("want") != "rows":
            return None
        _TICKETS[f"t{len(_TICKETS)}"] = self.shard
        return {"ticket": f"t{len(_TICKETS) - 1}"}

    def close(self):
        pass


class _Client:
    kind = "test_inprocess"
    fail = False

    def params(self, client):
        return {"want": "rows"}

    def connect(self, params, *, shard_id, address, timeout_s, metadata=(), tls=None):
        if _Client.fail:
            raise ConnectionError("refused")
        return _InProcessPath(_TICKETS.pop(params["ticket"]), shard_id, address)


@pytest.fixture
def seam(tmp_path):
    datapath.register_transport(datapath.Transport("test_inprocess", _Server, _Client))
    root = str(tmp_path)
    version = Table.create(_config(), root).snapshot()
    servers = [serve_shard(Shard.load(root, version, i), admin_token=TOKEN, data_paths=("test_inprocess",))
               for i in range(2)]
    try:
        yield root, version, servers
    finally:
        _Client.fail = False
        for s in servers:
            s.stop(grace=None)


def _remote(root, servers, **kw):
    return connect([s.address for s in servers], store_root=root, timeout_s=10, retries=1, **kw)


def test_the_first_transport_both_sides_have_is_chosen_and_equals_in_process(seam):
    root, version, servers = seam
    local = Table.open(root, version)
    remote = _remote(root, servers, admin_token=TOKEN, data_paths=("not_registered", "test_inprocess"))
    ids = torch.arange(-1, 90)
    assert torch.equal(local.fetch(ids), remote.fetch(ids))
    assert [s.data_path_kind for s in remote.shards] == ["test_inprocess"] * 2
    with pytest.raises(errors.StaleVersion):               # the shard's domain error, through the transport
        remote.shards[0].fetch(torch.arange(3), version=version + 7)
    plain = _remote(root, servers, admin_token=TOKEN)
    plain.fetch(ids)
    assert [s.data_path_kind for s in plain.shards] == ["grpc"] * 2


def test_fallback_to_grpc_when_the_fast_path_cannot_connect_and_handles_need_credentials(seam, caplog):
    root, version, servers = seam
    _Client.fail = True
    remote = _remote(root, servers, admin_token=TOKEN, data_paths=("test_inprocess",))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(remote.fetch(torch.arange(90)), Table.open(root, version).fetch(torch.arange(90)))
    assert [s.data_path_kind for s in remote.shards] == ["grpc"] * 2 and "refused" in caplog.text
    _Client.fail = False
    with pytest.raises(errors.Unauthenticated):   # every call needs a token now (auth.py), the first one too
        _remote(root, servers, admin_token="wrong", data_paths=("test_inprocess",)).fetch(torch.arange(3))
    shard = _remote(root, servers, admin_token=TOKEN).shards[0]
    shard._md = ((wire.MD_AUTHORIZATION, wire.bearer("wrong")),)
    with pytest.raises(errors.Unauthenticated):   # and OpenDataPath, which hands out the handles
        shard._call(shard._store.OpenDataPath, pb.OpenDataPathRequest(kinds=["test_inprocess"]))


def test_open_data_path_bounds_its_request(seam):
    root, _, servers = seam
    remote = _remote(root, servers, admin_token=TOKEN)
    shard = remote.shards[0]
    req = pb.OpenDataPathRequest(kinds=["k"] * 17)
    with pytest.raises(errors.InvalidArgument, match="kinds"):
        shard._call(shard._store.OpenDataPath, req, admin=True)


# The same-host transports (store_service/transport: their own tests cover them further, the
# cross-host one among them with real processes). CUDA IPC is not among them here: its handles
# cannot be opened in the process that made them, and these servers share the test's process;
# tests/store/test_transport_cuda.py checks it through this seam against a shard process.
@pytest.mark.parametrize("kind", sorted(k for k, t in datapath.transports().items()
                                        if k == "shm" and t.available()))
def test_every_registered_transport_returns_the_in_process_rows_bitwise(tmp_path, kind):
    root = str(tmp_path)
    version = Table.create(_config(), root).snapshot()
    servers = [serve_shard(Shard.load(root, version, i), admin_token=TOKEN, data_paths=(kind,)) for i in range(2)]
    try:
        local, remote = Table.open(root, version), _remote(root, servers, admin_token=TOKEN, data_paths=(kind,))
        ids = torch.randint(-1, 90, (200,), generator=torch.Generator().manual_seed(2))
        assert torch.equal(local.fetch(ids), remote.fetch(ids).cpu())
        assert {s.data_path_kind for s in remote.shards} == {kind}
    finally:
        for s in servers:
            s.stop(grace=None)


def test_a_streamed_fetch_during_hot_swaps_sees_one_version(tmp_path):
    import threading
    root = str(tmp_path)
    t = Table.create(_config(), root)
    v1 = t.snapshot()
    t.accumulate_value_grads(torch.arange(90), torch.randn(90, 12, generator=torch.Generator().manual_seed(3)))
    t.end_step(0)
    v2 = t.snapshot()
    every = torch.arange(90)
    want = [Table.open(root, v).fetch(every) for v in (v1, v2)]
    assert not torch.equal(want[0], want[1])
    servers = [serve_shard(Shard.load(root, v1, i), admin_token=TOKEN) for i in range(2)]
    reader = connect([s.address for s in servers], admin_token=TOKEN, store_root=root, timeout_s=20,
                     wire_config=SMALL)
    admin = connect([s.address for s in servers], admin_token=TOKEN, store_root=root, timeout_s=20)
    seen, bad, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            got = reader.fetch(every)        # 90 rows over 2 shards, each in parts of pieces on 3 channels
            match = [i for i, w in enumerate(want) if torch.equal(got, w)]
            seen.update(match) if match else bad.append(got)
    thread = threading.Thread(target=read)
    thread.start()
    try:
        for v in (v2, v1, v2, v1):
            admin.load_version(v)
            time.sleep(0.2)   # reads under each version, and across each flip
    finally:
        stop.set()
        thread.join(timeout=60)
        for table in (reader, admin):
            for s in table.shards:
                s.close()
        for s in servers:
            s.stop(grace=None)
    assert not bad and seen == {0, 1}


def test_available_kinds_keeps_the_asked_order_and_drops_what_this_host_lacks():
    shm_here = datapath.transports()["shm"].available()
    assert datapath.available_kinds(["nope", "shm"]) == (("shm",) if shm_here else ())
    assert datapath.available_kinds(["shm", "cuda_ipc"])[:1] == (("shm",) if shm_here else ())
    assert ("cuda_ipc" in datapath.available_kinds()) == datapath.transports()["cuda_ipc"].available()
    assert datapath.available_kinds() == tuple(k for k in datapath.SAME_HOST_KINDS
                                               if datapath.transports()[k].available())
