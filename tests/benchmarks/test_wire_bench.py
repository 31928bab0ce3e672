"""benchmarks/wire_bench.py's CPU smoke: every phase runs, against real shard server processes,
and writes the issue's headline with provenance; the remote training run's losses match the
in-process ones."""
import json

from benchmarks import wire_bench


def test_wire_bench_smoke_writes_the_headline(tmp_path):
    out = tmp_path / "wire_bench.json"
    result = wire_bench.main([
        "--device", "cpu", "--rows", "65536", "--d-v", "64", "--d-k", "32", "--reps", "1", "--readout-tokens", "256",
        "--search-queries", "256", "--search-reps", "3", "--search-warmup", "1", "--server-threads", "1", "--phases", "fetch,search,readout,train",
        "--train-preset", "d1024-tiny", "--train-corpus", "tiny", "--train-batch-size", "4", "--train-seq-len", "32",
        "--train-steps", "2", "--train-warm-steps", "1", "--train-pairs", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["headline"] == json.loads(json.dumps(result["headline"]))
    head = saved["headline"]
    assert set(head) >= {"fetch_gbps_same_host", "fetch_gbps_tcp", "fetch_gbps_in_process", "readout_gbps_same_host",
                         "search_ms_4096_remote", "remote_over_local_tokens_per_s_d1024"}
    assert head["fetch_gbps_tcp"] > 0 and head["fetch_gbps_in_process"] > 0 and head["search_ms_4096_remote"] > 0
    assert head["remote_over_local_tokens_per_s_d1024"] is None       # only the d1024 preset fills it
    # The TLS arm beside the plain figures, and where a remote search's time goes.
    assert head["fetch_gbps_tcp_tls"] > 0 and head["search_ms_4096_remote_tls"] > 0
    assert head["search_ms_4096_remote_min"] <= head["search_ms_4096_remote"] <= head["search_ms_4096_remote_max"]
    assert set(saved["data"]["tls"]["fetch"]) == {"1024", "10240", "65536"}
    assert saved["data"]["search"]["grpc"]["ms"]["reps"] == 3
    parts = saved["data"]["search_parts"]
    assert {"shard_host", "encode_request", "decode_answer", "rpc_1_query", "shard_call", "protobuf", "client_gc"} <= set(parts)
    # Raw bytes: 256 x 32 fp32 queries up, 256 x 32 int32 ids + fp32 scores down, a few bytes of header.
    assert 0 <= parts["request_mb"] - 256 * 32 * 4 / 1e6 < 1e-4 and 0 <= parts["answer_mb"] - 256 * 32 * 8 / 1e6 < 1e-4
    data = saved["data"]
    assert data["transport_used"]["grpc"] == ["grpc"]
    assert set(data["fetch"]["grpc"]) == {"1024", "10240", "65536"}   # 102,400 capped at the table's rows
    train = saved["train"]
    assert train["preset"] == "d1024-tiny" and len(train["pairs"]) == 2 and train["remote_over_local"] > 0
    assert train["model"]["knowledge_layers"] == [1, 2] and train["table"]["value_dtype"] == "bfloat16"
    assert train["loss_max_rel_diff_remote_vs_local"] < 1e-5
    prov = saved["provenance"]
    assert prov["commit"] and prov["device"] == "cpu" and "wire_bench" in prov["command"]


def test_merge_takes_the_phases_not_run_only_from_the_same_clean_commit(tmp_path):
    import pytest
    earlier = {"provenance": {"commit": "abc", "dirty": False}, "data": {"fetch": {"grpc": {}}}, "train": {"x": 1}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    now = {"provenance": {"commit": "abc", "dirty": False}, "train": {"x": 2}}
    wire_bench.merge_earlier(now, str(path), force=False)
    assert now["data"] == earlier["data"] and now["train"] == {"x": 2} and now["merged"]["phases"] == ["data"]
    with pytest.raises(SystemExit, match="rerun"):
        wire_bench.merge_earlier({"provenance": {"commit": "def", "dirty": False}}, str(path), force=False)


def test_merge_takes_the_data_phases_a_partial_call_left_empty(tmp_path):
    # a search-only call has "data" with fetch and readout empty: those come from the earlier
    # result, its own search stays (the first such merge, on the H100, dropped the fetch figures)
    earlier = {"provenance": {"commit": "abc", "dirty": False},
               "data": {"fetch": {"grpc": {"1024": 1}}, "readout": {"grpc": 2}, "search": {"grpc": "old"}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    now = {"provenance": {"commit": "abc", "dirty": False},
           "data": {"fetch": {}, "readout": {}, "search": {"grpc": "new"}, "search_parts": {"x": 1}}}
    wire_bench.merge_earlier(now, str(path), force=False)
    assert now["data"] == {"fetch": {"grpc": {"1024": 1}}, "readout": {"grpc": 2}, "search": {"grpc": "new"},
                           "search_parts": {"x": 1}}
    assert now["merged"]["phases"] == ["data.fetch", "data.readout"]
