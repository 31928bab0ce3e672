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
