"""The gRPC client over 3 real shard servers (loopback) gives the in-process table's numbers.

Both tables start from the same published version; every operation is run on
both and compared (fp32: equal ids, values within 1e-6), then the optimizer
step and the edits, and the state after them.
"""
from __future__ import annotations

import pytest
import torch

from store_service.client import RemoteShard, connect
from store_service.config import OptimizerConfig, RowOptimizer, TableConfig
from store_service.serve import start_shard_process
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.testing import served_table

TOKEN = "parity-token"
ATOL = 1e-6


def _config(kind: str = "adam") -> TableConfig:
    # 16^2 product rows + 120 flat rows over 3 shards; the store holds the codebooks.
    return TableConfig(d_k=16, d_v=24, segments=[("product", 16), ("flat", 120)], store_codebooks=True,
                       num_shards=3, bias_step=1e-2, seed=3, optimizer=OptimizerConfig(kind, lr=0.05))


@pytest.fixture(params=[(True, 0), (False, 0), (True, 5)],
                ids=["compact-readout", "full-grid-readout", "compact-readout-in-chunks-of-5-rows"])
def tables(tmp_path, request):
    root = str(tmp_path)
    version = Table.create(_config(), root).snapshot()
    local = Table.open(root, version)
    servers = [serve_shard(Shard.load(root, version, i), admin_token=TOKEN) for i in range(3)]
    remote = connect([s.address for s in reversed(servers)], admin_token=TOKEN, store_root=root, timeout_s=20,
                     compact_readout=request.param[0], readout_chunk_rows=request.param[1])
    try:
        yield local, remote
    finally:
        remote.close()
        for s in remote.shards:
            s.close()
        for s in servers:
            s.stop(grace=None)


def _same_search(a, b):
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores, atol=ATOL, rtol=0)
    assert (a.keys is None) == (b.keys is None)
    if a.keys is not None:
        torch.testing.assert_close(a.keys, b.keys, atol=ATOL, rtol=0)


def _close(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_remote_table_matches_in_process(tables):
    local, remote = tables
    gen = torch.Generator().manual_seed(0)
    li, ri = local.info(), remote.info()
    assert (li.d_k, li.d_v, li.num_rows, li.value_dtype, li.segments) == \
           (ri.d_k, ri.d_v, ri.num_rows, ri.value_dtype, ri.segments)
    assert all(s.address for s in ri.shards) and all(isinstance(s, RemoteShard) for s in remote.shards)
    N, d_k, d_v, k = li.num_rows, li.d_k, li.d_v, 8

    for step in range(3):
        q = torch.randn(12, d_k, generator=gen)
        s_loc, s_rem = local.search(q, k), remote.search(q, k)
        _same_search(s_loc, s_rem)
        assert s_rem.keys is None       # keys only when asked
        _same_search(local.search(q, k, want_keys=True), remote.search(q, k, want_keys=True))
        assert bool((s_loc.ids >= 256).any()) and bool((s_loc.ids < 256).any())  # both segments hit

        ids = s_loc.ids.clone()
        ids[0, -2:] = -1  # padding travels too
        w = torch.softmax(s_loc.scores.masked_fill(ids < 0, float("-inf")), -1)
        _close(local.fetch(ids.reshape(-1)), remote.fetch(ids.reshape(-1)))
        _close(local.readout(ids, w), remote.readout(ids, w))
        g = torch.randn(12, d_v, generator=gen)
        _close(local.readout_backward(ids, w, g, request_id=f"bwd-{step}"),
               remote.readout_backward(ids, w, g, request_id=f"bwd-{step}"))
        flat = ids[(ids >= 256)][:10]
        kg = torch.randn(flat.numel(), d_k, generator=gen)
        local.accumulate_key_grads(flat, kg, request_id=f"key-{step}")
        remote.accumulate_key_grads(flat, kg, request_id=f"key-{step}")
        assert local.end_step(step) == remote.end_step(step) == step + 1

    # The optimizer moved values, flat keys and biases the same way.
    every = torch.arange(N)
    _close(local.fetch(every), remote.fetch(every))
    q = torch.randn(20, d_k, generator=gen)
    _same_search(local.search(q, k), remote.search(q, k))
    lu, ru = local.usage(), remote.usage()
    for f in ("hits", "weight_sum", "frozen", "ablated"):
        assert torch.equal(getattr(lu, f), getattr(ru, f)), f

    # Edits through the admin API: freeze, ablate, add rows.
    hot = s_loc.ids[:, 0].unique()
    for t in (local, remote):
        t.set_frozen(hot[:3], True)
        t.set_ablated(hot[3:6], True)
    new_v = torch.randn(5, d_v, generator=gen)
    new_k = torch.randn(5, d_k, generator=gen)
    assert torch.equal(local.add_rows(new_v, new_k), remote.add_rows(new_v, new_k))
    # ... and rows with a selection bias: one the queries cannot miss, one they cannot reach
    big_k = q.mean(0, keepdim=True).expand(2, d_k) * 100
    bias = torch.tensor([0.0, -1e6])
    assert torch.equal(local.add_rows(new_v[:2], big_k, bias), remote.add_rows(new_v[:2], big_k, bias))
    assert remote.info().num_rows == local.info().num_rows == N + 7
    s_new = remote.search(q, k)
    assert bool((s_new.ids == N + 6).sum() == 0) and bool((s_new.ids == N + 5).any())
    _same_search(local.search(q, k), s_new)
    lu, ru = local.usage(), remote.usage()
    for f in ("hits", "weight_sum", "frozen", "ablated"):
        assert torch.equal(getattr(lu, f), getattr(ru, f)), f
    _close(local.fetch(torch.arange(N + 7)), remote.fetch(torch.arange(N + 7)))


def test_bf16_readout_wire_halves_the_bytes_and_stays_close(tmp_path):
    """readout_wire_dtype="bfloat16": partial readouts and their gradients travel in bf16 (half
    the bytes of those tensors); the shards sum and accumulate in fp32, so results stay within
    bf16 rounding of the in-process table's, and an SGD step moves the rows the same way (Adam's
    first step is sign(g) * lr, which a rounded near-zero gradient can flip)."""
    from benchmarks.common import ByteCounter

    root = str(tmp_path)
    version = Table.create(_config("sgd"), root).snapshot()
    local = Table.open(root, version)
    servers = [serve_shard(Shard.load(root, version, i), admin_token=TOKEN) for i in range(3)]
    counters = {"float32": ByteCounter(), "bfloat16": ByteCounter()}
    remotes = {d: connect([s.address for s in servers], admin_token=TOKEN, store_root=root,
                          readout_wire_dtype=d, interceptors=[c]) for d, c in counters.items()}
    try:
        gen = torch.Generator().manual_seed(2)
        d_k, d_v = _config().d_k, _config().d_v
        q = torch.randn(64, d_k, generator=gen)
        s = local.search(q, 8)
        w = torch.softmax(s.scores, -1)
        g = torch.randn(64, d_v, generator=gen)
        for c in counters.values():
            c.enabled = True
        want = local.readout(s.ids, w)
        got = remotes["bfloat16"].readout(s.ids, w)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
        _close(remotes["float32"].readout(s.ids, w), want)
        # Only the bf16 client's backward is applied, so the step compares with the local one.
        want_gw = local.readout_backward(s.ids, w, g, request_id="b")
        got_gw = remotes["bfloat16"].readout_backward(s.ids, w, g, request_id="b")
        torch.testing.assert_close(got_gw, want_gw, rtol=2e-2, atol=2e-2 * float(want_gw.abs().max()))
        assert local.end_step(0) == remotes["bfloat16"].end_step(0) == 1
        every = torch.arange(_config().num_rows)
        torch.testing.assert_close(remotes["float32"].fetch(every), local.fetch(every), rtol=1e-2, atol=1e-3)
        # A bf16 wire rounds fetched values too, handed back in the table's dtype.
        exact, rounded = remotes["float32"].fetch(every), remotes["bfloat16"].fetch(every)
        assert rounded.dtype == torch.float32 and torch.equal(rounded, exact.bfloat16().float())
        fp32, bf16 = counters["float32"].bytes, counters["bfloat16"].bytes
        # out is [64, 24] per shard: 6144 bytes in fp32, 3072 in bf16, over each of 3 shards
        # (give or take the dtype names and length prefixes)
        assert abs(fp32["Readout"] - bf16["Readout"] - 3 * 64 * d_v * 2) < 32
    finally:
        for r in remotes.values():
            r.close()
            for sh in r.shards:
                sh.close()
        for sv in servers:
            sv.stop(grace=None)


def test_bf16_values_travel_as_raw_bytes(tmp_path):
    root = str(tmp_path)
    cfg = TableConfig(d_k=8, d_v=16, segments=[("flat", 90)], value_dtype="bfloat16", num_shards=3)
    version = Table.create(cfg, root).snapshot()
    local = Table.open(root, version)
    with served_table(root, version, admin_token=TOKEN) as remote:
        ids = torch.tensor([0, 45, 89, -1, 31])
        got = remote.fetch(ids)
        assert got.dtype == torch.bfloat16 and torch.equal(got, local.fetch(ids))
        q = torch.randn(4, 8)
        _same_search(local.search(q, 5), remote.search(q, 5))
        w = torch.rand(1, 5)
        _close(local.readout(ids[None], w), remote.readout(ids[None], w))


def test_shard_servers_as_processes(tmp_path):
    """`python -m store_service.serve` processes serve the same numbers."""
    root = str(tmp_path)
    cfg = _config("sgd")
    version = Table.create(cfg, root).snapshot()
    local = Table.open(root, version)
    procs = []
    try:
        for i in range(3):
            procs.append(start_shard_process(root, version, i, admin_token=TOKEN, metrics_port=0,
                                             extra_args=["--torch-threads", "1", "--workers", "4"]))
        remote = connect([p.address for p in procs], admin_token=TOKEN, store_root=root)
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(16, cfg.d_k, generator=gen)
        s = local.search(q, 6)
        _same_search(s, remote.search(q, 6))
        w = torch.softmax(s.scores, -1)
        _close(local.readout(s.ids, w), remote.readout(s.ids, w))
        g = torch.randn(16, cfg.d_v, generator=gen)
        _close(local.readout_backward(s.ids, w, g), remote.readout_backward(s.ids, w, g))
        assert local.end_step(0) == remote.end_step(0) == 1
        every = torch.arange(cfg.num_rows)
        _close(local.fetch(every), remote.fetch(every))
        remote.close()
    finally:
        for p in procs:
            p.stop()


def test_set_optimizer_over_grpc_steps_as_in_process(tmp_path):
    """SetOptimizer: the remote table returns the settings it replaced, allocates Adam state
    on an SGD table, and then steps exactly as the in-process table switched the same way;
    switching back restores the settings."""
    root = str(tmp_path)
    version = Table.create(_config("sgd"), root).snapshot()
    local = Table.open(root, version)
    adam = OptimizerConfig("adam", lr=0.2, key_lr=0.1, betas=(0.8, 0.99))
    with served_table(root, version) as remote:
        for t in (local, remote):
            assert t.set_optimizer(adam, bias_step=0.05) == RowOptimizer(OptimizerConfig("sgd", lr=0.05), 1e-2)
        gen = torch.Generator().manual_seed(5)
        for step in range(2):
            q = torch.randn(10, 16, generator=gen)
            s = local.search(q, 6)
            w = torch.softmax(s.scores, -1)
            g = torch.randn(10, 24, generator=gen)
            for t in (local, remote):
                t.readout(s.ids, w)
                t.readout_backward(s.ids, w, g, request_id=f"b{step}")
                t.accumulate_key_grads(torch.tensor([256, 300]), torch.ones(2, 16), request_id=f"k{step}")
            assert local.end_step(step) == remote.end_step(step) == step + 1
        every = torch.arange(local.info().num_rows)
        assert torch.equal(local.fetch(every), remote.fetch(every))
        q = torch.randn(20, 16, generator=gen)
        _same_search(local.search(q, 8), remote.search(q, 8))
        for t in (local, remote):
            assert t.set_optimizer(OptimizerConfig("sgd", lr=0.05), bias_step=1e-2) == RowOptimizer(adam, 0.05)
        v = remote.snapshot()       # the remote shards kept (and wrote) the Adam state they allocated
        assert Table.open(root, v).shards[0].state_dict().keys() == local.shards[0].state_dict().keys()
