"""Each transport available on the CPU (shm, torch_dist over gloo) against the in-process shard:
bitwise the same rows, readouts and applied gradients, for several dtypes and sizes (one row,
more rows than the staging buffer holds, all padding, none)."""
from __future__ import annotations

import pytest
import torch

from store_service import errors
from store_service.client import RemoteShard
from store_service.config import OptimizerConfig, TableConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.transport.client import BulkPath
from store_service.transport.config import ClientConfig
from store_service.transport.shard import FastRemoteShard

TOKEN = "transport-parity"
KINDS = ["shm", "torch_dist"]
# 4 KiB in 2 slots: a 2 KiB slot holds 32 rows of 16 fp32 values, so 257 rows go as 9 pieces.
SMALL = ClientConfig(buffer_bytes=4096, slots=2, timeout_s=20)


def _config(dtype: str) -> TableConfig:
    return TableConfig(d_k=8, d_v=16, segments=[("flat", 600)], value_dtype=dtype, seed=5,
                       optimizer=OptimizerConfig("sgd", lr=0.5))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture(params=["float32", "bfloat16"])
def served(request):
    """(a served shard, an identical in-process twin)."""
    shard, twin = Shard(_config(request.param)), Shard(_config(request.param))
    server = serve_shard(shard, admin_token=TOKEN)
    yield server, shard, twin
    server.stop(grace=None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 257, 1000])
def test_fetch_is_bitwise_the_in_process_rows(served, kind, rows):
    server, shard, _ = served
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, 600, (rows,), generator=g)
    ids[::7] = -1
    path = BulkPath.open(server.address, TOKEN, kind, SMALL)
    try:
        got, want = path.fetch(ids), shard.fetch(ids)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(_bits(got), _bits(want))
        pads = torch.full((5,), -1)
        assert torch.equal(_bits(path.fetch(pads)), _bits(shard.fetch(pads)))
        half = path.fetch(ids, out_dtype=torch.bfloat16)   # the bfloat16 wire of a float32 table
        assert torch.equal(_bits(half), _bits(want.to(torch.bfloat16)))
        wide = path.fetch(ids, out_dtype=torch.float32)    # travels in the table's dtype, then widened
        assert torch.equal(_bits(wide), _bits(want.float()))
        with pytest.raises(errors.InvalidArgument) as remote_err:
            path.fetch(ids[:0])
        with pytest.raises(errors.InvalidArgument) as local_err:
            shard.fetch(ids[:0])
        assert remote_err.value.field == local_err.value.field == "ids"
        with pytest.raises(errors.InvalidArgument):
            path.fetch(torch.tensor([600]))   # not this shard's row: the shard's own error
    finally:
        path.close()


@pytest.mark.parametrize("kind", KINDS)
def test_readout_is_bitwise_the_in_process_readout(served, kind):
    server, shard, _ = served
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 600, (300, 4), generator=g)
    weights = torch.rand(300, 4, generator=g)
    path = BulkPath.open(server.address, TOKEN, kind, SMALL)
    try:
        want = shard.readout(ids, weights)
        assert torch.equal(_bits(path.readout(ids, weights)), _bits(want))
        assert torch.equal(_bits(path.readout(ids, weights, out_dtype="bfloat16")),
                           _bits(want.to(torch.bfloat16).float()))
    finally:
        path.close()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_applied_as_in_process(served, kind):
    server, shard, twin = served
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(-1, 600, (400,), generator=g)
    grads = torch.randn(400, 16, generator=g)
    key_ids = torch.randint(0, 600, (50,), generator=g)
    key_grads = torch.randn(50, 8, generator=g)
    path = BulkPath.open(server.address, TOKEN, kind, SMALL)
    try:
        path.accumulate_value_grads(ids, grads, request_id="a")
        path.accumulate_value_grads(ids, grads, request_id="a")   # a retry: accumulated once
        path.accumulate_key_grads(key_ids, key_grads, request_id="k")
    finally:
        path.close()
    twin.accumulate_value_grads(ids, grads, request_id="a")
    twin.accumulate_key_grads(key_ids, key_grads, request_id="k")
    assert shard.end_step(0) == twin.end_step(0) == 1
    a, b = shard.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(_bits(a[name]), _bits(b[name])), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("pieces", [1, 10])
def test_readout_backward_is_the_in_process_backward(served, kind, compact, pieces):
    """grad_weights bitwise; the applied row gradients bitwise in one piece. In several pieces
    the shard sums each piece's rows first (as it does per call), so rows repeated across
    pieces are summed in another order: equal to float rounding, as gRPC's readout_chunk_rows."""
    server, shard, twin = served
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(-1, 600, (300, 4), generator=g)
    weights = torch.rand(300, 4, generator=g)
    grad_out = torch.randn(300, 16, generator=g)
    path = BulkPath.open(server.address, TOKEN, kind, SMALL if pieces > 1 else ClientConfig(timeout_s=20))
    try:
        got = path.readout_backward(ids, weights, grad_out, request_id="b", compact=compact)
        path.readout_backward(ids, weights, grad_out, request_id="b", compact=compact)   # a retry: once
    finally:
        path.close()
    want = twin.readout_backward(ids, weights, grad_out, request_id="b")
    assert torch.equal(_bits(got), _bits(want))
    assert shard.end_step(0) == twin.end_step(0) == 1
    a, b = shard.state_dict(), twin.state_dict()
    for name in a:
        if pieces == 1:
            assert torch.equal(_bits(a[name]), _bits(b[name])), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_a_table_over_fast_shards_matches_the_in_process_table(tmp_path):
    cfg = TableConfig(d_k=8, d_v=16, segments=[("flat", 300)], num_shards=2, value_dtype="bfloat16", seed=1)
    version = Table.create(cfg, str(tmp_path)).snapshot()
    local = Table.open(str(tmp_path), version)
    servers = [serve_shard(Shard.load(str(tmp_path), version, i), admin_token=TOKEN) for i in range(2)]
    shards = [FastRemoteShard(RemoteShard(s.address, admin_token=TOKEN), TOKEN, SMALL) for s in servers]
    try:
        assert [s.kind for s in shards] == ["shm", "shm"]
        remote = Table(shards)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(-1, 300, (500,), generator=g)
        assert torch.equal(_bits(remote.fetch(ids)), _bits(local.fetch(ids)))
        rids, w = torch.randint(-1, 300, (64, 4), generator=g), torch.rand(64, 4, generator=g)
        assert torch.equal(remote.readout(rids, w), local.readout(rids, w))
        grad_out = torch.randn(64, 16, generator=g)
        assert torch.equal(remote.readout_backward(rids, w, grad_out), local.readout_backward(rids, w, grad_out))
    finally:
        for s in shards:
            s.close()
        for s in servers:
            s.stop(grace=None)


@pytest.mark.parametrize("kind", KINDS)
def test_one_path_serves_several_threads_at_once(served, kind):
    """Table calls a shard from an executor and may push gradients while it fetches: threads
    sharing one path each get their own answer."""
    import threading
    server, shard, _ = served
    path = BulkPath.open(server.address, TOKEN, kind, SMALL)
    failures = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(5):
                ids = torch.randint(-1, 600, (200,), generator=g)
                assert torch.equal(_bits(path.fetch(ids)), _bits(shard.fetch(ids)))
                path.accumulate_value_grads(ids, torch.randn(200, 16, generator=g), request_id=f"{seed}-{_}")
        except Exception as exc:   # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    path.close()
    assert not failures, failures
