"""benchmarks/quality.py --reuse: an earlier call's runs are taken only when trained the same way,
at the same commit; --summarize rebuilds a saved result; the throughput comparison."""
import json
from argparse import Namespace

import pytest

from benchmarks.common import git_commit
from benchmarks.quality import SAME_TRAINING, reuse_jobs
from benchmarks.quality_protocol import VARIANTS


def _args(**kw):
    base = dict(steps=2300, seq_len=64, batch_size=256, lr=3e-3, value_lr=None, knowledge='{"n_sub": 128}',
                knowledge_model="", warmup=40, corpus="medium-para", device="cuda", split_seed=24, size="small")
    return Namespace(**{**base, **kw})


def _job(v, seed, phase="tune"):
    return {"phase": phase, "variant": v.to_dict(), "seed": seed, "recall_heldout": 0.3, "heldout_loss": 2.4}


def _earlier(tmp_path, **config):
    cfg = {k: v for k, v in vars(_args()).items() if k in SAME_TRAINING}
    dense, moe = VARIANTS["small"]["dense"][0], VARIANTS["small"]["moe"][0]
    jobs = {f"tune/{dense.name}/100": _job(dense, 100), f"tune/{moe.name}/100": _job(moe, 100),
            f"test/{dense.name}/0": _job(dense, 0, "test")}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"device": "GPU", "provenance": {"commit": git_commit(), "dirty": False},
                                "config": {**cfg, **config}, "jobs": jobs}))
    return path


def test_reuse_takes_the_finished_runs(tmp_path):
    jobs, info = reuse_jobs(_args(), _earlier(tmp_path))
    assert set(jobs) == {"tune/dense/100", "tune/moe/100", "test/dense/0"} and info["runs"] == sorted(jobs)
    assert info["same_commit"] and not info["forced"]


def test_reuse_skips_runs_of_a_variant_defined_otherwise_now(tmp_path):
    path = _earlier(tmp_path)
    data = json.loads(path.read_text())
    data["jobs"]["tune/moe/100"]["variant"]["overrides"] = {"n_experts": 8}
    path.write_text(json.dumps(data))
    jobs, _ = reuse_jobs(_args(), path)
    assert "tune/moe/100" not in jobs and "tune/dense/100" in jobs


def test_reuse_counts_the_steps_a_time_budget_chose(tmp_path):
    path = _earlier(tmp_path, steps=1500)
    data = json.loads(path.read_text())
    data["calibration"] = {"steps": 2300}
    path.write_text(json.dumps(data))
    assert reuse_jobs(_args(), path)[0]


@pytest.mark.parametrize("field,value", [("batch_size", 32), ("corpus", "medium"), ("lr", 1e-3), ("split_seed", 3)])
def test_reuse_refuses_runs_trained_otherwise(tmp_path, field, value):
    with pytest.raises(SystemExit, match=field):
        reuse_jobs(_args(), _earlier(tmp_path, **{field: value}))


def test_summarize_rebuilds_the_headline_and_plot(tmp_path):
    """A saved result (e.g. gathered over calls with --reuse) summarized again: the same
    headline from its runs, a PNG, this call's provenance beside the runs'."""
    from benchmarks.quality import summarize, tuning_record
    fams = {f: VARIANTS["tiny"][f] for f in ("dense", "knowledge")}
    jobs = {}
    for f, vs in fams.items():
        for i, v in enumerate(vs):
            jobs[f"tune/{v.name}/100"] = {"recall_heldout": 0.1 * (2 - i), "heldout_loss": 2.0, "params": {"active": 1}}
            for s, r in ((0, 0.2), (1, 0.3), (2, 0.1)):
                jobs[f"test/{v.name}/{s}"] = {"seed": s, "recall_heldout": r + (0.1 if f == "knowledge" else 0),
                                              "right": [1, 0], "heldout_loss": 2.0, "recall_seen": 0.5,
                                              "variant": v.to_dict(), "params": {"active": 10, "total": 20},
                                              "tokens": 100}
    src = tmp_path / "q.json"
    src.write_text(json.dumps({
        "config": {"corpus": "tiny", "seeds": [0, 1, 2], "tune_seeds": [100], "steps": 5},
        "split": {"split_seed": 24, "tune_facts": 2, "tune_prompts": 2, "test_facts": 2, "test_prompts": 2,
                  "test_fact_of_prompt": [0, 1]},
        "tuning": tuning_record(fams, jobs, [100]), "jobs": jobs, "throughput": {"remote_over_fastest_local": 0.5},
        "provenance": {"commit": "abc", "device": "cpu"}}))
    h = summarize(src, tmp_path / "out.json")
    assert h["chosen"] == {"dense": "dense", "knowledge": "knowledge_1l"}
    assert h["test"]["knowledge"]["recall_heldout"]["median"] == pytest.approx(0.3)
    assert h["knowledge_minus_best_baseline"]["paired_by_seed"]["mean"] == pytest.approx(0.1)
    assert h["remote_over_fastest_local_tokens_per_s"] == 0.5
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["headline"] == json.loads(json.dumps(h)) and out["runs_provenance"]["commit"] == "abc"
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
        reuse_jobs(_args(), path)
    jobs, info = reuse_jobs(_args(force_reuse=True), path)
    assert jobs and info["forced"] and info["from_commit"] == "0" * 40
