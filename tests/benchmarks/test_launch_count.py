"""benchmarks/launch_count.py: the batched experts run fewer ops per training step than the
per-expert loop, counted on the same model and stream."""
from __future__ import annotations

import json

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
