"""Training: checkpoints are consistent cuts (2N steps == N + resume + N,
exactly, in fp32); remote table == in-process table (slow)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_worker.checkpoint import latest_checkpoint, load_for_inference, load_weights, read_meta
from model_worker.config import KnowledgeConfig, configs
from model_worker.train import TrainConfig, model_config, open_table, table_config, train
from store_service.testing import loopback_table

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


def _readout(mode: str) -> dict:
    return {"model_overrides": {"knowledge": {**configs["tiny-knowledge"]["knowledge"], "readout": mode}}}


@pytest.mark.parametrize("mode", ["fetch", "auto"])
def test_fetch_training_equals_pushdown(tmp_path, mode):
    """Fetch mode (readout and its backward on the worker from the fetched rows; row
    gradients and usage sent to the store) trains as pushdown does: the same losses, the
    same rows after, the same usage counts (flat rows too: they are balanced from those)."""
    runs = {m: train(_cfg(tmp_path / m, flat_rows=16, num_shards=2, **_readout(m))) for m in ("pushdown", mode)}
    ref, got = runs["pushdown"], runs[mode]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    t_ref, t_got = ref["model"].tables()[0], got["model"].tables()[0]
    ids = torch.arange(t_ref.info().num_rows)
    torch.testing.assert_close(t_got.fetch(ids), t_ref.fetch(ids), rtol=1e-4, atol=1e-6)
    u_ref, u_got = t_ref.usage(), t_got.usage()
    assert int(u_ref.hits.sum()) > 0 and torch.equal(u_got.hits, u_ref.hits)
    torch.testing.assert_close(u_got.weight_sum, u_ref.weight_sum, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pushdown", "fetch"])
def test_remote_equals_local(tmp_path, mode):
    """The same 50 steps with the in-process table and with the gRPC client over
    2 shard server processes (loopback) give the same losses (fp32, 1e-5 relative),
    with readouts on the shards (pushdown) or on the worker (fetch: row gradients and
    usage go to the shards in the background)."""
    cfg = _cfg(tmp_path / "local", steps=50, flat_rows=16, **_readout(mode))
    local = train(cfg)
    rcfg = _cfg(tmp_path / "remote", steps=50, flat_rows=16, num_shards=2, **_readout(mode))
    with loopback_table(table_config(model_config(rcfg, 260), rcfg), str(tmp_path / "remote" / "store")) as table:
        assert len(table.info().shards) == 2
        remote = train(rcfg, table=table)
        ids = torch.arange(table.info().num_rows)
        torch.testing.assert_close(table.fetch(ids), local["model"].tables()[0].fetch(ids), rtol=1e-4, atol=1e-6)
        assert torch.equal(table.usage().hits, local["model"].tables()[0].usage().hits)
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
@pytest.mark.parametrize("mode", ["pushdown", "fetch"])
def test_cuda_worker_with_remote_store(tmp_path, mode):
    """A GPU worker over 2 loopback shard servers (their answers arrive in host memory,
    off the wire) follows the same GPU worker with its table in its own GPU memory:
    results are moved back to the worker's device in forward and backward (fetch mode:
    row gradients and usage leave from the GPU in the background)."""
    cfg = _cfg(tmp_path / "local", steps=20, device="cuda", **_readout(mode))
    local = train(cfg)
    rcfg = _cfg(tmp_path / "remote", steps=20, num_shards=2, device="cuda", **_readout(mode))
    with loopback_table(table_config(model_config(rcfg, 260), rcfg), str(tmp_path / "remote" / "store")) as table:
        remote = train(rcfg, table=table)
    torch.testing.assert_close(torch.tensor(remote["losses"]), torch.tensor(local["losses"]), rtol=1e-4, atol=0)


def test_checkpoints_written_before_the_renames_load(legacy_v1, tmp_path):
    """tests/data/legacy_v1/checkpoint was written when "gate" named the SiLU output gate
    (KnowledgeConfig.gate) and the MoE router's projection (router.gate): both load under
    today's names (output_gate, router.proj), strictly."""
    ckpt = legacy_v1 / "checkpoint"
    old = load_file(str(ckpt / "model.safetensors"))
    assert "gate" in read_meta(ckpt)["model_config"]["knowledge"]
    assert any(name.endswith(".router.gate.weight") for name in old)
    model, _, _ = load_for_inference(ckpt)
    assert model.cfg.knowledge.output_gate is True and model.knowledge_layers()[0].wg is not None
    for i, block in enumerate(model.layers):
        if block.ffn is not None:
            assert torch.equal(block.ffn.router.proj.weight, old[f"layers.{i}.ffn.router.gate.weight"])
    assert KnowledgeConfig.from_dict({"gate": False}).output_gate is False
    # strict: a file without one of the model's parameters is refused, naming it
    save_file({k: v for k, v in old.items() if not k.endswith("wq.weight")}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match="wq.weight"):
        load_weights(model, tmp_path / "partial.safetensors")
