"""benchmarks/scale_bench.py's CPU smoke mode: every phase runs on a small table, the
checks it records hold (loads and compactions bitwise, no failed or mixed call during the
swaps, deltas written as format 3), and a second run merges into the first one's JSON."""
import json
import os

from benchmarks import scale_bench


def test_scale_bench_smoke_runs_every_phase_and_merges(tmp_path):
    out = str(tmp_path / "scale.json")
    common = ["--device", "cpu", "--rows", "16k", "--d-v", "64", "--d-k", "32", "--search-batch", "32",
              "--dd-gb", "0.03", "--out", out, "--store-root", str(tmp_path / "store")]
    first = scale_bench.main(common + ["--fresh", "--phases", "disk,create,optimizer,search,fetch,persist,swap,host"])
    ph = first["phases"]
    assert ph["disk"]["all"]["write_gbps"] > 0 and ph["disk"]["all"]["read_gbps"] > 0
    assert ph["create"]["16k"]["rows"] == 128 * 128
    persist = ph["persist"]["16k"]
    assert persist["load_bitwise_equal"] and persist["snapshot_gbps"] > 0
    inc = persist["incremental"]
    assert inc["last_format"] == 3 and inc["compacted_bitwise_equal_live"]
    assert inc["delta_bytes"]["median"] < persist["version_bytes"] / 10
    swap = ph["swap"]["16k"]
    assert swap["calls"] > 0 and swap["failed"] == 0 and swap["mixed"] == 0
    assert first["headline"]["swap_failed_calls"] == 0
    assert set(first["headline"]) >= {"max_rows_one_gpu", "create_s_16m", "optimizer_bytes_over_values",
                                      "snapshot_gbps", "load_gbps", "incremental_snapshot_speedup_1pct",
                                      "disk_write_gbps", "disk_read_gbps", "swap_s_16m", "swap_failed_calls",
                                      "search_qps_16m", "fetch_rows_per_s_16m"}
    assert os.path.exists(out.replace(".json", ".png"))
    # a second run: one version at a time (the serving table replaced by the loaded one), merged
    scale_bench.main(common + ["--phases", "persist,fetch", "--keep-one-above", "4k", "--rows", "16k"])
    with open(out) as f:
        merged = json.load(f)
    assert merged["phases"]["swap"]["16k"] == swap and merged["phases"]["create"]["16k"] == ph["create"]["16k"]
    assert "load_bitwise_equal" not in merged["phases"]["persist"]["16k"]   # the big path: no second copy
    assert merged["phases"]["persist"]["16k"]["incremental"]["compacted_bitwise_equal_live"]
    assert len(merged["runs"]) == 2 and merged["provenance"]["command"]
