"""README's Benchmarks table is what benchmarks/readme_table.py makes from the results JSONs."""
import json

import pytest

from benchmarks import readme_table as rt


def test_readme_table_is_the_generated_one():
    readme = rt.README.read_text()
    assert rt.BEGIN in readme and rt.END in readme
    assert rt.render(readme) == readme, "README's table differs: python -m benchmarks.readme_table --write"


def test_every_row_reads_a_results_file_that_exists():
    for name, *_ in rt.ROWS:
        assert (rt.RESULTS / name).exists() or (rt.RESULTS / "archive" / name).exists(), name


def test_the_table_follows_the_json(tmp_path, monkeypatch):
    """A changed figure in a results file changes the table (nothing in it is typed by hand)."""
    d = {"headline": {"search_grpc_over_local_p50": 1.5, "readout_grpc_over_local_p50": 0.5,
                      "pushdown_bytes_per_token": 1000.0, "fetch_bytes_per_token": 9000.0},
         "provenance": {"commit": "a" * 40, "dirty": False, "machine": {"cpu_model": "X", "cores": 2},
                        "device": "cpu", "date": "2026-01-01T00:00:00+00:00"}}
    (tmp_path / "store_bench.json").write_text(json.dumps(d))
    monkeypatch.setattr(rt, "RESULTS", tmp_path)
    monkeypatch.setattr(rt, "ROOT", tmp_path)
    row = next(line for line in rt.table().splitlines() if "store_bench" in line)
    assert "**1.50x**" in row and "**0.50x**" in row and "archived" not in row and "commit aaaaaaa" in row
    d["headline"]["search_grpc_over_local_p50"] = 2.25
    (tmp_path / "store_bench.json").write_text(json.dumps(d))
    assert "**2.25x**" in rt.table()


def test_a_readme_without_markers_is_refused():
    with pytest.raises(SystemExit, match="markers"):
        rt.render("# no table here\n")


def test_the_quality_row_of_the_protocol_shows_choices_spreads_and_the_interval():
    spread = {"median": 0.2, "min": 0.1, "max": 0.3}
    fam = {"recall_heldout": spread, "recall_seen": spread}
    h = {"test": {"dense": fam, "knowledge": fam}, "split": {"test_facts": 300, "test_prompts": 310},
         "tuning_trials_per_family": {"dense": 2, "knowledge": 2}, "tuning_seeds": [100], "steps": 1500,
         "seeds": [0, 1, 2], "chosen": {"dense": "dense_5x152", "knowledge": "knowledge_1l"},
         "knowledge_minus_best_baseline": {"baseline": "dense",
                                           "paired_by_seed": {"mean": 0.012, "se": 0.004},
                                           "bootstrap_over_test_facts": {"lo": -0.01, "hi": 0.03}}}
    cell = rt.quality({"headline": h})
    assert "(2 trials per family, seeds [100])" in cell and "knowledge -> knowledge_1l" in cell
    assert "dense 0.200 [0.100, 0.300]" in cell and "(dense): **+0.012** ± 0.004" in cell
    assert "[-0.010, +0.030]" in cell and "300 facts" in cell
