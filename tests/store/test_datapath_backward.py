"""readout_backward through the DataPath seam: grad_out (the bulk payload) goes through the
pair's same-host transport where one is open, else gRPC; the shard stays the only writer
(row gradients applied at its end_step). Every transport available on the CPU gives bitwise
the table the in-process path gives after end_step, and the gRPC path's, and the same
gradient of the weights. And a path that loses its session (the shard restarted) is dropped:
the call is made again over gRPC, the next one opens a path afresh."""
from __future__ import annotations

import pytest
import torch

from store_service import datapath
from store_service.transport.registry import SessionTable
from store_service.client import connect
from store_service.config import OptimizerConfig, TableConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table

TOKEN = "backward-token"
# CUDA IPC handles cannot be opened in the process that made them (these servers share the
# test's process): tests/store/test_transport_cuda.py checks cuda_ipc against a shard process.
KINDS = ["grpc"] + sorted(k for k, t in datapath.transports().items() if k in ("shm", "torch_dist") and t.available())


def _config(dtype: str) -> TableConfig:
    return TableConfig(d_k=8, d_v=24, segments=[("flat", 300)], num_shards=2, value_dtype=dtype, seed=7,
                       optimizer=OptimizerConfig("sgd", lr=0.5))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def _steps(table, grads_of) -> list[torch.Tensor]:
    """Two steps of pushdown backward, each followed by end_step -> [grad_weights..., all rows]."""
    out = []
    for step, (ids, weights, grad_out) in enumerate(grads_of):
        out.append(table.readout_backward(ids, weights, grad_out, request_id=f"step{step}"))
        table.end_step(step)
    out.append(table.fetch(torch.arange(300)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_readout_backward_through_each_path_is_bitwise_in_process(tmp_path, kind, dtype):
    root = str(tmp_path)
    version = Table.create(_config(dtype), root).snapshot()
    g = torch.Generator().manual_seed(11)
    grads_of = []
    for _ in range(2):   # 64 tokens x k 6, repeated rows within a call (summed by the shard)
        ids = torch.randint(-1, 300, (64, 6), generator=g)
        grads_of.append((ids, torch.rand(64, 6, generator=g), torch.randn(64, 24, generator=g)))
    want = _steps(Table.open(root, version), grads_of)
    paths = () if kind == "grpc" else (kind,)
    servers = [serve_shard(Shard.load(root, version, i), admin_token=TOKEN, data_paths=paths) for i in range(2)]
    remote = connect([s.address for s in servers], admin_token=TOKEN, store_root=root, timeout_s=20,
                     data_paths=paths)
    try:
        got = _steps(remote, grads_of)
        assert [s.data_path_kind for s in remote.shards] == [kind] * 2
    finally:
        for s in remote.shards:
            s.close()
        for s in servers:
            s.stop(grace=None)
    for w, g_ in zip(want, got):
        assert torch.equal(_bits(w), _bits(g_))


@pytest.mark.skipif("shm" not in KINDS, reason="no shm transport here")
def test_a_path_that_lost_its_session_is_redone_over_grpc_then_reopened(tmp_path):
    root = str(tmp_path)
    version = Table.create(_config("float32"), root).snapshot()
    local = Table.open(root, version)
    shards = [Shard.load(root, version, i) for i in range(2)]
    servers = [serve_shard(s, admin_token=TOKEN, data_paths=("shm",)) for s in shards]
    remote = connect([s.address for s in servers], admin_token=TOKEN, store_root=root, timeout_s=20,
                     data_paths=("shm",))
    try:
        ids = torch.arange(-1, 300)
        assert torch.equal(remote.fetch(ids), local.fetch(ids))
        assert [s.data_path_kind for s in remote.shards] == ["shm"] * 2
        for s in shards:   # as a restart does: the sessions are gone, the clients do not know
            SessionTable.of(s).close_all()
        g = torch.Generator().manual_seed(1)
        sel, w, grad_out = torch.randint(0, 300, (32, 4), generator=g), torch.rand(32, 4, generator=g), \
            torch.randn(32, 24, generator=g)
        assert torch.equal(remote.readout_backward(sel, w, grad_out, request_id="r"),
                           local.readout_backward(sel, w, grad_out, request_id="r"))
        assert [s.data_path_kind for s in remote.shards] == ["grpc"] * 2   # that call went over gRPC
        remote.end_step(0)
        local.end_step(0)
        assert torch.equal(remote.fetch(ids), local.fetch(ids))              # and the next opened shm again
        assert [s.data_path_kind for s in remote.shards] == ["shm"] * 2
    finally:
        for s in remote.shards:
            s.close()
        for s in servers:
            s.stop(grace=None)
