"""Training: checkpoints are consistent cuts (2N steps == N + resume + N,
exactly, in fp32); remote table == in-process table (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from model_worker.checkpoint import latest_checkpoint
from model_worker.train import TrainConfig, open_table, train

N = 5


def _cfg(out_dir, model="tiny-knowledge", **kw) -> TrainConfig:
    return TrainConfig(**{**dict(model=model, steps=2 * N, warmup=3, batch_size=4, seq_len=32, eval_every=0,
                                 out_dir=str(out_dir), progress=False), **kw})


@pytest.mark.parametrize("model", ["tiny-knowledge", "tiny-moe"])
def test_resume_is_exact(tmp_path, model):
    full = train(_cfg(tmp_path / "full", model))
    first = train(_cfg(tmp_path / "split", model), stop_at=N)
    ckpt = latest_checkpoint(tmp_path / "split")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == N
    table = None
    if model == "tiny-knowledge":
        assert meta["table_version"] >= 1
        table = open_table(meta["store_root"], meta["table_version"])   # a fresh process would do this
        assert table.info().step == N
    second = train(_cfg(tmp_path / "split", model), table=table, resume=tmp_path / "split")
    assert second["start_step"] == N
    losses = first["losses"] + second["losses"]
    assert losses == full["losses"]                                       # bitwise, fp32
    assert second["final_loss"] == full["final_loss"]
    sd_full, sd_resumed = full["model"].state_dict(), second["model"].state_dict()
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_resumed[k]), k
    if table is not None:                                                 # the store's half of the cut
        ids = torch.arange(table.info().num_rows)
        assert torch.equal(full["model"].tables()[0].fetch(ids), table.fetch(ids))


@pytest.mark.slow
def test_remote_equals_local(tmp_path):
    """The same 50 steps with the in-process table and with the gRPC client over
    2 shard server processes (loopback) give the same losses (fp32, 1e-5 relative)."""
    from model_worker.remote_table import loopback_table
    from model_worker.train import model_config, table_config

    cfg = _cfg(tmp_path / "local", steps=50, flat_rows=16)
    local = train(cfg)
    rcfg = _cfg(tmp_path / "remote", steps=50, flat_rows=16, num_shards=2)
    with loopback_table(table_config(model_config(rcfg, 260), rcfg), str(tmp_path / "remote" / "store")) as table:
        assert len(table.info().shards) == 2
        remote = train(rcfg, table=table)
        ids = torch.arange(table.info().num_rows)
        torch.testing.assert_close(table.fetch(ids), local["model"].tables()[0].fetch(ids), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(remote["losses"]), torch.tensor(local["losses"]), rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_matches_cpu(tmp_path):
    """The knowledge model on the GPU (Triton readout and product-key kernels, the
    table's shards in GPU memory) follows the CPU run step for step."""
    losses = {}
    for dev in ("cpu", "cuda"):
        cfg = TrainConfig(model="tiny-knowledge", steps=30, eval_every=0, progress=False, seed=0,
                          out_dir=str(tmp_path / dev), device=dev)
        losses[dev] = train(cfg)["losses"]
    for a, b in zip(losses["cpu"], losses["cuda"]):
        assert abs(a - b) <= 1e-5 * abs(a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_worker_with_remote_store(tmp_path):
    """A GPU worker over 2 loopback shard servers (their answers arrive in host memory,
    off the wire) follows the same GPU worker with its table in its own GPU memory:
    results are moved back to the worker's device in forward and backward."""
    from model_worker.remote_table import loopback_table
    from model_worker.train import model_config, table_config

    cfg = _cfg(tmp_path / "local", steps=20, device="cuda")
    local = train(cfg)
    rcfg = _cfg(tmp_path / "remote", steps=20, num_shards=2, device="cuda")
    with loopback_table(table_config(model_config(rcfg, 260), rcfg), str(tmp_path / "remote" / "store")) as table:
        remote = train(rcfg, table=table)
    torch.testing.assert_close(torch.tensor(remote["losses"]), torch.tensor(local["losses"]), rtol=1e-4, atol=0)
