"""benchmarks/quality.py --reuse: an earlier call's runs are taken only when trained the same way."""
import json
from argparse import Namespace

import pytest

from benchmarks.common import git_commit
from benchmarks.quality import SAME_TRAINING, reuse_runs


def _args(**kw):
    base = dict(steps=2300, seq_len=64, batch_size=256, lr=3e-3, value_lr=None, knowledge='{"n_sub": 128}',
                knowledge_model="", warmup=40, corpus="medium-para", device="cuda")
    return Namespace(**{**base, **kw})


def _earlier(tmp_path, **config):
    cfg = {k: v for k, v in vars(_args()).items() if k in SAME_TRAINING}
    run = {"evals": [{"step": 2300, "recall_heldout": 0.3, "heldout_loss": 2.4}]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"device": "GPU", "provenance": {"commit": git_commit(), "dirty": False},
                                "config": {**cfg, **config},
                                "runs_by_seed": {"0": {"dense": run, "moe": run}, "1": {"dense": run}}}))
    return path


def test_reuse_takes_finished_runs_of_the_seeds_and_models_asked_for(tmp_path):
    by_seed = {0: {}, 2: {}}
    info = reuse_runs(_args(), _earlier(tmp_path), by_seed, ["dense", "knowledge"])
    assert set(by_seed[0]) == {"dense"} and by_seed[2] == {}
    assert info["runs"] == ["dense_seed0"]


def test_reuse_skips_runs_of_a_model_whose_preset_has_changed(tmp_path):
    """A run records its preset; when the benchmark's model for that key is another preset now
    (the knowledge model moved to small-knowledge-2l), the old run is retrained, not taken."""
    from benchmarks.quality import RUNS
    path = _earlier(tmp_path)
    data = json.loads(path.read_text())
    data["runs_by_seed"]["0"]["knowledge"] = {**data["runs_by_seed"]["0"]["dense"], "preset": "small-knowledge"}
    data["runs_by_seed"]["0"]["dense"]["preset"] = RUNS["dense"]
    path.write_text(json.dumps(data))
    by_seed = {0: {}}
    info = reuse_runs(_args(), path, by_seed, ["dense", "knowledge"])
    assert set(by_seed[0]) == {"dense"} and info["runs"] == ["dense_seed0"]


def test_reuse_counts_the_steps_a_time_budget_chose(tmp_path):
    path = _earlier(tmp_path, steps=1500)
    data = json.loads(path.read_text())
    data["calibration"] = {"steps": 2300}
    path.write_text(json.dumps(data))
    by_seed = {0: {}}
    reuse_runs(_args(), path, by_seed, ["dense"])
    assert "dense" in by_seed[0]


@pytest.mark.parametrize("field,value", [("batch_size", 32), ("corpus", "medium"), ("lr", 1e-3)])
def test_reuse_refuses_runs_trained_otherwise(tmp_path, field, value):
    by_seed = {0: {}}
    with pytest.raises(SystemExit, match=field):
        reuse_runs(_args(), _earlier(tmp_path, **{field: value}), by_seed, ["dense"])
    assert by_seed == {0: {}}


def _run(recall, loss=2.4, steps=(2300,)):
    return {"evals": [{"step": s, "recall_heldout": recall, "heldout_loss": loss} for s in steps],
            "final_recall": {"seen": {"recall": 0.9}}, "params": {"active": 10, "total": 20}, "tokens": 100}


def test_headline_reports_seed_spread_and_paired_differences():
    from benchmarks.quality import headline
    by_seed = {0: {"dense": _run(0.2), "knowledge": _run(0.4)},
               1: {"dense": _run(0.3), "knowledge": _run(0.2)}}
    h = headline({"runs_by_seed": by_seed, "runs": by_seed[0]}, ["dense", "knowledge"], [0, 1], "medium")
    assert h["recall_heldout"] == pytest.approx({"dense": 0.25, "knowledge": 0.3})
    # paired per seed: +0.2 and -0.1 -> mean 0.05, sd 0.2121, se 0.15
    assert h["knowledge_recall_minus"]["dense"] == pytest.approx(0.05)
    assert h["knowledge_recall_minus_se"]["dense"] == pytest.approx(0.15)
    assert h["recall_heldout_se"]["dense"] == pytest.approx(0.05)
    assert h["knowledge_wins_per_seed"] == {0: True, 1: False}
    assert h["remote_over_local_tokens_per_s"] is None


def test_summarize_rebuilds_headline_and_plot_of_runs_evaluated_at_other_steps(tmp_path):
    """Runs gathered over calls with different --evals: the plot draws the shared steps."""
    from benchmarks.quality import summarize
    by_seed = {"0": {"dense": _run(0.2, steps=(700, 1400, 2300)), "knowledge": _run(0.4)},
               "1": {"dense": _run(0.3), "knowledge": _run(0.2)}}
    src = tmp_path / "q.json"
    src.write_text(json.dumps({"config": {"corpus": "medium"}, "runs_by_seed": by_seed, "runs": by_seed["0"],
                               "throughput": {"remote_over_local": 0.5}}))
    h = summarize(src, tmp_path / "out.json")
    assert h["remote_over_local_tokens_per_s"] == 0.5
    assert h["recall_heldout"]["knowledge"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "out.json").read_text())["headline"] == json.loads(json.dumps(h))
    assert (tmp_path / "out.png").stat().st_size > 0


def test_throughput_times_steady_steps_and_counts_wire_bytes(tmp_path):
    """The remote vs in-process comparison: same losses, the timed steps' bytes by RPC."""
    from benchmarks.quality import throughput
    args = Namespace(steps=100, seq_len=16, batch_size=2, lr=3e-3, value_lr=None, knowledge='{"n_sub": 16}',
                     warmup=2, corpus="tiny", evals=1, progress=False, device="cpu", eval_batch_size=8,
                     seeds=[0], tput_steps=2, server_device=None, knowledge_model="",
                     wire_variants="grid-fp32,compact-bf16,compact-fp32-c8", no_breakdown=False, server_threads=1,
                     tput_readouts="pushdown", tput_repeats=1)
    out = throughput(args, tmp_path)
    assert out["readout"] == "pushdown" and "by_readout" not in out
    assert out["timed_steps"] == 2 and out["max_rel_loss_diff"] == 0.0
    assert "wire_bytes_per_step" not in out["local"]
    assert out["remote"]["calls_per_step"]["Readout"] == 2 * 2   # one per shard and knowledge layer (2 of each)
    assert out["remote"]["wire_bytes_per_step"]["Readout"] > 2 * 16 * 4   # at least the partial sums
    assert out["remote_over_local"] == pytest.approx(out["remote"]["tokens_per_s"] / out["local"]["tokens_per_s"])
    # The other wire formats, same run: the full grid is exact and bigger, bf16 is smaller and close.
    grid, bf16 = out["wire_variants"]["grid-fp32"], out["wire_variants"]["compact-bf16"]
    compact = out["remote"]["wire_bytes_per_step"]
    assert grid["max_rel_loss_diff"] == 0.0 and 0 < bf16["max_rel_loss_diff"] < 1e-2
    for rpc in ("Readout", "ReadoutBackward"):
        assert grid["wire_bytes_per_step"][rpc] > compact[rpc] > bf16["wire_bytes_per_step"][rpc]
    # 2 x 16 tokens x 2 heads = 64 rows: 8 calls per shard; the shard sums the row gradients of
    # 8 requests instead of 1, in another order: equal up to fp32 rounding
    chunked = out["wire_variants"]["compact-fp32-c8"]
    assert chunked["max_rel_loss_diff"] < 1e-5 and chunked["calls_per_step"]["Readout"] == 2 * 2 * 8
    # The breakdown bills time to each table call and RPC, on both sides of the wire.
    b = out["breakdown"]
    assert set(b["local"]["table_call_seconds_per_step"]) >= {"readout", "readout_backward", "end_step"}
    for side in ("rpc_client_seconds_per_step", "rpc_server_seconds_per_step"):
        # Describe is per step too: a remote end_step first checks that every shard is at the
        # same step and version (store_service/consistency.py, issue 18)
        assert set(b["remote"][side]) >= {"Readout", "ReadoutBackward", "EndStep", "Describe"}
        assert all(v > 0 for v in b["remote"][side].values())


def test_throughput_compares_readout_modes_side_by_side(tmp_path):
    """Fetch mode moves the selected rows and their gradients instead of partial readouts;
    remote = local there too, and each mode keeps its own in-process run beside it."""
    from benchmarks.quality import throughput
    args = Namespace(steps=100, seq_len=16, batch_size=2, lr=3e-3, value_lr=None, knowledge='{"n_sub": 16}',
                     warmup=2, corpus="tiny", evals=1, progress=False, device="cpu", eval_batch_size=8,
                     seeds=[0], tput_steps=2, server_device=None, knowledge_model="", wire_variants="",
                     no_breakdown=True, server_threads=1, tput_readouts="pushdown,fetch", tput_repeats=3)
    out = throughput(args, tmp_path)
    modes = out["by_readout"]
    for r in (out, *out["runs_by_readout"].values()):   # the median of 3 pairs, each kept
        assert len(r["remote_over_local_per_repeat"]) == 3 and len(r["repeats"]) == 2
        assert r["remote_over_local"] == sorted(r["remote_over_local_per_repeat"])[1]
    assert set(modes) == {"pushdown", "fetch"} and out["readout"] in modes
    # the headline mode is the one whose remote runs have the highest median tokens/s (the
    # representative pair's own run, out["remote"], need not be that median)
    runs = {m: out if m == out["readout"] else out["runs_by_readout"][m] for m in modes}
    assert out["readout"] == max(modes, key=lambda m: runs[m]["remote_tokens_per_s_median"])
    fetch = out if out["readout"] == "fetch" else out["runs_by_readout"]["fetch"]
    assert fetch["max_rel_loss_diff"] < 1e-5 and modes["fetch"]["local_tokens_per_s"] > 0
    calls = fetch["remote"]["calls_per_step"]
    assert "Readout" not in calls and "ReadoutBackward" not in calls
    assert calls["Fetch"] == calls["AccumulateValueGrads"] == 2 * 2   # shards x layers


def test_wire_bench_times_each_format_against_the_in_process_table(tmp_path):
    """benchmarks/wire_bench.py on a small shape: every format's calls, bytes and times."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "wire.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "wire_bench.py"
    subprocess.run([sys.executable, str(script), "--phases", "pushdown", "--pd-rows", "256", "--pd-n-sub", "16",
                    "--reps", "2", "--pd-variants", "grid-fp32,compact-bf16-c64", "--out", str(out)],
                   check=True, timeout=300)
    r = json.loads(out.read_text())["pushdown"]   # the readout variants are wire_bench's pushdown phase
    grid, chunked = r["remote"]["grid-fp32"], r["remote"]["compact-bf16-c64"]
    assert grid["readout"]["calls"] == 2 and chunked["readout"]["calls"] == 2 * 4
    assert chunked["readout_backward"]["wire_mb"] < grid["readout_backward"]["wire_mb"]
    for run in (grid, chunked):
        for op in ("readout", "readout_backward"):
            assert run[op]["table_ms"] > 0 and run[op]["client_rpc_ms"] > 0 and run[op]["server_ms"] > 0
    assert r["in_process"]["readout"]["table_ms"] > 0 and r["server_phases"]["rows"] == 256


def test_reuse_refuses_runs_of_another_commit_unless_forced(tmp_path):
    path = _earlier(tmp_path)
    data = json.loads(path.read_text())
    data["provenance"]["commit"] = "0" * 40
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="refusing to reuse"):
        reuse_runs(_args(), path, {0: {}}, ["dense"])
    by_seed = {0: {}}
    info = reuse_runs(_args(force_reuse=True), path, by_seed, ["dense"])
    assert "dense" in by_seed[0] and info["forced"] and info["from_commit"] == "0" * 40
