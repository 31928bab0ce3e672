"""benchmarks/ray_placement.py end to end on this CPU: a real embedded Ray cluster, two shard
actors with host rows (no GPU here, so the 'gpu' placement is refused up front), `kstore
status` in a second process, swaps and a scale under client threads, and the JSON it writes."""
import json

import pytest

pytest.importorskip("ray")

from benchmarks import ray_placement  # noqa: E402


def test_parse_placement():
    assert ray_placement.parse_placement("gpu:0.25, gpu,host") == [
        {"rows": "gpu", "num_gpus": 0.25}, {"rows": "gpu", "num_gpus": 0.5}, {"rows": "host"}]
    for bad in ("gpu:0", "gpu:1.5", "ssd", ""):
        with pytest.raises(Exception):
            ray_placement.parse_placement(bad)
    cfg = ray_placement.cluster_config("/tmp/x", ray_placement.parse_placement("gpu:0.25,host"))
    # shards past the placement list (after a scale) keep host rows
    assert [cfg.shard_resources(i).rows for i in range(4)] == ["gpu", "host", "host", "host"]
    assert cfg.shard_resources(0).ray_options()["num_gpus"] == 0.25


def test_check_devices_refuses_a_shard_off_its_placement():
    cfg = ray_placement.cluster_config("/tmp/x", ray_placement.parse_placement("gpu:0.5,host"))
    mem = {"device": "cpu", "pinned": False, "gpu_ids": [], "rows": 8, "value_bytes": 16, "key_bytes": 0,
           "optimizer": "sgd", "optimizer_bytes": 64}
    status = {"shards": [{"shard": i, "memory": dict(mem), "rows": [0, 8], "version": 1, "healthy": True}
                         for i in range(2)]}
    with pytest.raises(RuntimeError, match="configured for gpu"):
        ray_placement.check_devices(status, cfg, cuda=False)
    status["shards"][0]["memory"].update(device="cuda:0", gpu_ids=["0"])
    assert [s["device"] for s in ray_placement.check_devices(status, cfg, cuda=False)] == ["cuda:0", "cpu"]
    with pytest.raises(RuntimeError, match="configured for host"):   # host rows unpinned where CUDA exists
        ray_placement.check_devices(status, cfg, cuda=True)


@pytest.mark.slow
def test_ray_placement_end_to_end_on_cpu(tmp_path):
    import ray
    if ray.is_initialized():
        ray.shutdown()
    out = tmp_path / "rp.json"
    result = ray_placement.main(["--device", "cpu", "--rows", "4096", "--d-v", "32", "--d-k", "16",
                                 "--placement", "host,host", "--scale-shards", "3", "--seconds", "1",
                                 "--settle-s", "0.5", "--drain-s", "0.5", "--clients", "2", "--queries", "16",
                                 "--probe-rows", "32", "--out", str(out)])
    assert not ray.is_initialized()
    written = json.loads(out.read_text())
    assert written["headline"] == result["headline"] and written["provenance"]["device"] == "cpu"
    h = written["headline"]
    assert h["rows"] == 4096 and [s["placement"] for s in h["shards"]] == ["host", "host"]
    assert all(s["device"] == "cpu" and s["rows"] == 2048 and s["value_bytes"] == 2048 * 32 * 2
               for s in h["shards"])
    # the command line's status, from a second process, reports the same shards
    cli = written["kstore_status"]
    assert [s["device"] for s in cli["shards"]] == ["cpu", "cpu"]
    assert [s["memory"]["rows"] for s in cli["output"]["shards"]] == [2048, 2048]
    assert h["devices_after_swaps"] == ["cpu", "cpu"] and h["pinned_after_swaps"] == [False, False]
    assert written["device"] == "cpu"
    ph = written["phases"]
    assert [s["to_version"] for s in ph["swaps"]] == [2, 1, 2] and all(s["during"]["calls"] > 0 for s in ph["swaps"])
    assert h["kstore_status_ok"] and h["scale_s"] > 0 and h["scale_skipped"] is None and h["scale_error"] is None
    assert [s["rows"] for s in h["scaled_shards"]] == [1344, 1408, 1344]
    assert h["calls"] > 0 and h["failed_calls"] == 0 and h["mixed_answers"] == 0, written["errors"]
    assert written["final_status"]["shards"][0]["version"] == ph["scale"]["version"]
    from benchmarks import readme_table       # README's row renders this JSON as written
    row = readme_table.ray_placement(written)
    assert "4,096 rows" in row and "host -> cpu" in row and "**0** failed and **0** mixed" in row


def test_a_failed_run_still_writes_what_it_has(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ray_placement, "publish", broken)
    out = tmp_path / "rp.json"
    with pytest.raises(SystemExit, match="ray_placement failed"):
        ray_placement.main(["--device", "cpu", "--rows", "4096", "--placement", "host", "--out", str(out)])
    written = json.loads(out.read_text())
    assert "disk full" in written["error"] and "disk full" in written["headline"]["error"]
    assert written["provenance"]["device"] == "cpu"
    from benchmarks import readme_table
    assert readme_table.ray_placement(written).startswith("failed: ") and "disk full" in readme_table.ray_placement(written)
