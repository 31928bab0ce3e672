"""benchmarks/optimizer_tradeoff.py under issue 24's rules: the same lr grid (factors of a
centre) for every row optimizer, each kind's lr chosen on the tuning half only, the
reported runs on the test half, finished runs kept for --reuse."""
import json

import pytest

from benchmarks import optimizer_tradeoff as ot
from benchmarks.common import git_commit

TINY = ["--model", "tiny-knowledge", "--knowledge", "{}", "--corpus", "tiny", "--steps", "2", "--seq-len", "16",
        "--batch-size", "2", "--warmup", "1"]


def test_every_kind_gets_the_same_grid_of_factors():
    args = ot.parse_args(TINY + ["--store-optimizers", "sgd,rowwise_adam:0.02,adam", "--lr-grid", "0.5,1,2"])
    g = ot.grid(args)
    assert g == {"sgd": [500.0, 1000.0, 2000.0], "rowwise_adam": [0.01, 0.02, 0.04], "adam": [0.005, 0.01, 0.02]}


def test_tuning_seeds_must_be_disjoint_from_reported_seeds():
    with pytest.raises(SystemExit):
        ot.parse_args(TINY + ["--seeds", "0,1", "--tune-seeds", "1"])


def _r(recall, loss, opt=0.1):
    return {"recall_heldout": recall, "heldout_loss": loss, "optimizer_over_values": opt}


def test_the_lr_is_chosen_from_tuning_runs_only_and_reported_from_test_runs():
    lrs = {"sgd": [10.0, 100.0]}
    runs = {"tune/sgd/10/100": _r(0.0, 2.0), "tune/sgd/100/100": _r(0.0, 1.5),      # 100 wins on tuning loss
            "test/sgd/10/0": _r(0.9, 0.1), "test/sgd/100/0": _r(0.2, 1.4), "test/sgd/100/1": _r(0.4, 1.6)}
    t = ot.tuning_record(lrs, runs, [100])
    assert t["sgd"]["winner_lr"] == 100.0 and t["sgd"]["trials"] == 2
    h = ot.headline(t, runs, [0, 1])["sgd"]
    assert h["lr"] == 100.0 and h["recall_heldout"]["median"] == pytest.approx(0.3)
    assert (h["heldout_loss"]["min"], h["heldout_loss"]["max"]) == (1.4, 1.6)


def test_a_tiny_run_tunes_on_one_half_reports_the_other_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "ot.json"
    argv = TINY + ["--store-optimizers", "rowwise_adam", "--lr-grid", "1,10", "--seeds", "0", "--out", str(out)]
    ot.main(argv)
    r = json.loads(out.read_text())
    assert not out.with_suffix(".parts.json").exists()
    assert r["provenance"]["commit"] == git_commit() and r["provenance"]["command"]
    lo, hi = ot.grid(ot.parse_args(argv))["rowwise_adam"]          # the preset's row lr x 1 and x 10
    assert hi == pytest.approx(10 * lo) and r["tuning"]["rowwise_adam"]["winner_lr"] in (lo, hi)
    assert set(r["runs"]) == {f"tune/rowwise_adam/{lo:g}/100", f"tune/rowwise_adam/{hi:g}/100",
                              f"test/rowwise_adam/{r['tuning']['rowwise_adam']['winner_lr']:g}/0"}
    split = r["split"]
    for key, run in r["runs"].items():      # tuning runs see the tuning half's prompts, the reported run the test half's
        assert run["n_prompts"] == (split["tune_prompts"] if key.startswith("tune/") else split["test_prompts"])
    assert r["headline"]["optimizers"]["rowwise_adam"]["optimizer_over_values"] > 0
    # A call cut off leaves its finished runs; --reuse takes them and trains nothing again.
    parts = tmp_path / "earlier.parts.json"
    parts.write_text(json.dumps({k: r[k] for k in ("provenance", "config", "runs")}))
    out2 = tmp_path / "ot2.json"
    ot.main(argv[:-1] + [str(out2), "--reuse", str(parts)])
    r2 = json.loads(out2.read_text())
    assert r2["runs"] == r["runs"] and r2["reused"]["runs"] == sorted(r["runs"])
    with pytest.raises(SystemExit, match="other settings"):
        ot.main(argv[:-1] + [str(out2), "--reuse", str(parts), "--split-seed", "3"])
