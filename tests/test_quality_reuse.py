"""benchmarks/quality.py --reuse: an earlier call's runs are taken only when trained the same way."""
import json
from argparse import Namespace

import pytest

from benchmarks.quality import SAME_TRAINING, reuse_runs


def _args(**kw):
    base = dict(steps=2300, seq_len=64, batch_size=256, lr=3e-3, value_lr=None, knowledge='{"n_sub": 128}',
                warmup=40, corpus="medium-para", device="cuda")
    return Namespace(**{**base, **kw})


def _earlier(tmp_path, **config):
    cfg = {k: v for k, v in vars(_args()).items() if k in SAME_TRAINING}
    run = {"evals": [{"step": 2300, "recall_heldout": 0.3, "heldout_loss": 2.4}]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"device": "GPU", "command": "python benchmarks/quality.py",
                                "config": {**cfg, **config},
                                "runs_by_seed": {"0": {"dense": run, "moe": run}, "1": {"dense": run}}}))
    return path


def test_reuse_takes_finished_runs_of_the_seeds_and_models_asked_for(tmp_path):
    by_seed = {0: {}, 2: {}}
    info = reuse_runs(_args(), _earlier(tmp_path), by_seed, ["dense", "knowledge"])
    assert set(by_seed[0]) == {"dense"} and by_seed[2] == {}
    assert info["runs"] == ["dense_seed0"]


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
                     seeds=[0], tput_steps=2, server_device=None)
    out = throughput(args, tmp_path)
    assert out["timed_steps"] == 2 and out["max_rel_loss_diff"] == 0.0
    assert "wire_bytes_per_step" not in out["local"]
    assert out["remote"]["calls_per_step"]["Readout"] == 2   # one per shard
    assert out["remote"]["wire_bytes_per_step"]["Readout"] > 2 * 16 * 4   # at least the partial sums
    assert out["remote_over_local"] == pytest.approx(out["remote"]["tokens_per_s"] / out["local"]["tokens_per_s"])
