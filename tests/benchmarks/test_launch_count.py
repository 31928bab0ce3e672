"""benchmarks/launch_count.py: the batched experts run fewer ops per training step than the
per-expert loop, counted on the same model and stream; host syncs on CUDA are counted from
torch's sync debug warnings (unknown on the CPU)."""
from __future__ import annotations

import json
import warnings
from collections import Counter

import torch

from benchmarks import launch_count


def test_batched_experts_run_fewer_ops_than_the_loop(tmp_path):
    out = tmp_path / "lc.json"
    launch_count.main(["--models", "dense,moe", "--people", "300", "--batch-size", "2", "--steps", "1",
                       "--warm", "1", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    ops = result["headline"]["aten_ops_per_step"]
    assert set(ops) == {"dense", "moe_batched", "moe_loop"}
    assert ops["moe_loop"] > 1.5 * ops["moe_batched"] > 0
    assert ops["dense"] < ops["moe_batched"]
    assert result["provenance"]["commit"]
    # every host wait is counted on a GPU only: on the CPU the field says unknown
    assert all(r["host_syncs_cuda_per_step"] is None for r in result["runs"])
    assert set(result["headline"]["host_syncs_cuda_per_step"]) == set(ops)
    # the matmul FLOPs a token costs (the MoE's two experts and shared one: a little more than
    # dense's FFN at matched active parameters), and the rate each timed step reached
    flops = {r["model"]: r["train_flops_per_token"] for r in result["runs"]}
    assert flops["moe"] > flops["dense"] > 0
    assert all(v > 0 for v in result["headline"]["achieved_tflop_per_s"].values())


def test_the_4m_size_counts_the_4m_models(tmp_path):
    out = tmp_path / "lc4.json"
    launch_count.main(["--size", "gpu4m", "--models", "dense", "--people", "300", "--batch-size", "1", "--steps", "1",
                       "--warm", "1", "--threads", "1", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["preset"] == "cap4m-dense" and run["params"]["active"] > 3.9e6


def test_cuda_syncs_are_counted_from_the_sync_debug_warnings(monkeypatch):
    """Each warning of torch's sync debug mode counts once (two from one line are two syncs),
    other warnings not; the mode is set to warn inside and restored after."""
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter, where = Counter(), Counter()
    with launch_count.counting_cuda_syncs(counter, where=where):
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation (Triggered internally)")
        warnings.warn("something else")
    assert counter["cuda_syncs"] == 2 and modes == ["warn", 0]
    # ... and by the line that waited, named from the repository's root
    (line, n), = where.items()
    assert line.startswith("tests/benchmarks/test_launch_count.py:") and n == 2
    with warnings.catch_warnings(record=True), launch_count.counting_cuda_syncs(counter, enabled=False):
        warnings.warn("called a synchronizing CUDA operation")
    assert counter["cuda_syncs"] == 2


def test_op_sources_charge_forward_backward_and_optimizer_ops_to_their_code():
    """Every aten op of a profiled step is charged once: a forward op to our function that
    called it, a backward op to the forward code that made its autograd node, the optimizer's
    to `optimizer`."""
    from torch.profiler import profile

    from benchmarks.op_sources import op_sources
    from model_worker.moe import FeedForward

    ffn = FeedForward(8, 16)
    opt = torch.optim.AdamW(ffn.parameters(), foreach=False)
    x = torch.randn(4, 8)
    with profile(with_stack=True) as prof:
        ffn(x).square().sum().backward()
        opt.step()
    events = prof.events()
    sources = op_sources(events)
    assert sum(sources.values()) == sum(e.name.startswith("aten::") for e in events)
    forward = [s for s in sources if s.startswith("model_worker/moe.py(") and s.endswith(": forward -> linear")]
    backward = [s for s in sources if s.startswith("backward of model_worker/moe.py(") and "[MmBackward0]" in s]
    assert forward and backward and sources["optimizer"] > 0
    assert sum(sources[s] for s in backward) > sum(sources[s] for s in forward)  # two matmuls back per matmul forward
