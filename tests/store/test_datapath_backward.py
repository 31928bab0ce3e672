"""readout_backward through the DataPath seam: grad_out (the bulk payload) goes through the
pair's same-host transport where one is open, else gRPC; the shard stays the only writer
(row gradients applied at its end_step). Every transport available on the CPU gives bitwise
the table the in-process path gives after end_step, and the gRPC path's, and the same
gradient of the weights."""
from __future__ import annotations

import pytest
import torch

from store_service import datapath
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
