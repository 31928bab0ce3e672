"""benchmarks/capacity_tune.py: the lr choice from finished runs, the settings check that
keeps a tuning from being applied to runs trained another way, and one whole tiny call
whose choice capacity.py then trains with."""
from __future__ import annotations

import json

import pytest

from benchmarks import capacity, capacity_tune


def _run(model, lr, bits):
    return {"spec": {"model": model, "lr": lr}, "bits": bits}


def test_choose_takes_the_most_bits_ties_to_the_smaller_lr_and_flags_the_grid_edge():
    grid = [1e-3, 2e-3, 4e-3]
    runs = {"a": _run("dense", 1e-3, 10.0), "b": _run("dense", 2e-3, 30.0), "c": _run("dense", 4e-3, 20.0),
            "d": _run("knowledge", 2e-3, 50.0), "e": _run("knowledge", 4e-3, 50.0)}
    out = capacity_tune.choose(runs, ["dense", "knowledge"], grid)
    assert out["chosen_lr"] == {"dense": 2e-3, "knowledge": 2e-3}
    assert out["at_grid_edge"] == {"dense": False, "knowledge": False}
    assert not out["complete"]                                   # knowledge lacks lr 1e-3
    runs["f"] = _run("knowledge", 1e-3, 60.0)
    out = capacity_tune.choose(runs, ["dense", "knowledge"], grid)
    assert out["chosen_lr"]["knowledge"] == 1e-3 and out["at_grid_edge"]["knowledge"] and out["complete"]
    assert out["bits"]["dense"] == {"0.001": 10.0, "0.002": 30.0, "0.004": 20.0}


def test_a_reported_seed_is_refused_as_the_tuning_population():
    with pytest.raises(SystemExit, match="reported"):
        capacity_tune.main(["--size", "tiny", "--seed", "1", "--budget-s", "0"])


def test_lr_from_refuses_a_tuning_trained_another_way_or_missing_a_model(tmp_path):
    tune = {"settings": {"size": "tiny", "batch_size": 4, "exposures": 1},
            "headline": {"chosen_lr": {"dense": 3e-3}}}
    f = tmp_path / "tune.json"
    f.write_text(json.dumps(tune))
    ns = capacity.argparse.Namespace(size="tiny", batch_size=4, exposures=1, models=["dense"], untuned=[], lr=1e-2)
    assert capacity.lr_by_model(str(f), ns) == {"dense": 3e-3}
    with pytest.raises(SystemExit, match="batch_size"):
        capacity.lr_by_model(str(f), capacity.argparse.Namespace(**{**vars(ns), "batch_size": 8}))
    with pytest.raises(SystemExit, match="knowledge"):
        capacity.lr_by_model(str(f), capacity.argparse.Namespace(**{**vars(ns), "models": ["dense", "knowledge"]}))
    # a model named in --untuned keeps --lr, on purpose and on the record
    both = capacity.argparse.Namespace(**{**vars(ns), "models": ["dense", "knowledge"], "untuned": ["knowledge"]})
    assert capacity.lr_by_model(str(f), both) == {"dense": 3e-3, "knowledge": 1e-2}


def test_a_tiny_tuning_call_and_a_capacity_call_that_trains_at_its_choice(tmp_path):
    common = ["--size", "tiny", "--people", "16", "--exposures", "1", "--models", "dense,knowledge", "--vocab", "600",
              "--batch-size", "4", "--seq-len", "32", "--budget-s", "600", "--jobs", "1", "--recall-people", "8"]
    tune_out = tmp_path / "tune.json"
    capacity_tune.main([*common, "--lr-grid", "1e-3,1e-2", "--runs-dir", str(tmp_path / "tune_runs"),
                        "--out", str(tune_out)])
    tune = json.loads(tune_out.read_text())
    h = tune["headline"]
    assert h["complete"] and h["seed"] == capacity_tune.TUNE_SEED and set(h["chosen_lr"]) == {"dense", "knowledge"}
    assert len(tune["runs"]) == 4 and all(r["spec"]["seed"] == capacity_tune.TUNE_SEED for r in tune["runs"].values())
    for m in ("dense", "knowledge"):      # the choice is the grid point with the most bits
        assert h["bits"][m][f"{h['chosen_lr'][m]:g}"] == max(h["bits"][m].values())
    assert tune_out.with_suffix(".png").exists() and tune["provenance"]["command"]
    out = tmp_path / "cap.json"
    capacity.main([*common, "--seeds", "0", "--lr-from", str(tune_out), "--runs-dir", str(tmp_path / "runs"),
                   "--out", str(out)])
    res = json.loads(out.read_text())
    assert {r["spec"]["model"]: r["spec"]["lr"] for r in res["runs"].values()} == h["chosen_lr"]
    assert res["config"]["lr_from"] == str(tune_out)
    assert res["headline"]["lr"]["tuned"] == {"dense": True, "knowledge": True}
    assert res["headline"]["lr"]["by_model"] == {m: [lr] for m, lr in h["chosen_lr"].items()}
    other = list(common)
    other[other.index("--batch-size") + 1] = "8"
    with pytest.raises(SystemExit, match="tuned with other settings"):
        capacity.main([*other, "--seeds", "0", "--lr-from", str(tune_out), "--out", str(tmp_path / "x.json")])
