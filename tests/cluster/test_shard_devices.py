"""Where shard actors keep their rows: the cluster config names it per shard (rows "gpu",
"host", "auto" with num_gpus), the actor picks the device, `status` reports it with the
bytes held. On this CPU a Ray node declares stand-in GPUs (and a "fake_gpu" custom
resource that places the GPU shards); CUDA is absent, so "auto" falls back to host memory
and says so, and "gpu" refuses."""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.config import ClusterConfig, ShardResources  # noqa: E402
from cluster.launch import StoreCluster  # noqa: E402
from cluster.shard_actor import rows_device  # noqa: E402
from store_service.config import TableConfig  # noqa: E402


def test_rows_device_choices():
    assert rows_device("gpu", [3], True) == {"device": "cuda:0", "pin_memory": False, "gpu_ids": ["3"], "note": ""}
    assert rows_device("auto", [1], True)["device"] == "cuda:0"
    host = rows_device("host", [1], True)
    assert host["device"] == "cpu" and host["pin_memory"] is True
    assert rows_device("auto", [], True) == {"device": "cpu", "pin_memory": True, "gpu_ids": [], "note": ""}
    fallback = rows_device("auto", [0], False)
    assert fallback["device"] == "cpu" and not fallback["pin_memory"] and "not available" in fallback["note"]
    for rows, ids, cuda in (("gpu", [], True), ("gpu", [0], False)):
        with pytest.raises(RuntimeError):
            rows_device(rows, ids, cuda)
    with pytest.raises(ValueError):
        rows_device("disk", [], True)


def test_cluster_config_per_shard_rows():
    cfg = ClusterConfig.from_dict({"num_shards": 3, "shard": {"num_cpus": 0.25},
                                   "shard_overrides": {"0": {"num_gpus": 0.5, "rows": "gpu"}, "2": {"rows": "host"}}})
    assert cfg.shard_resources(0).rows == "gpu" and cfg.shard_resources(0).ray_options()["num_gpus"] == 0.5
    assert cfg.shard_resources(0).num_cpus == 0.25
    assert cfg.shard_resources(1) is cfg.shard and cfg.shard_resources(2).rows == "host"
    assert ClusterConfig.from_dict(cfg.to_dict()).shard_resources(0).rows == "gpu"
    with pytest.raises(ValueError):
        ShardResources(rows="gpu")                       # no GPU asked of Ray
    with pytest.raises(ValueError):
        ClusterConfig(shard_overrides={"0": {"rows": "ssd"}})
    with pytest.raises(ValueError):
        ClusterConfig(shard_overrides={"first": {"rows": "host"}})


@pytest.mark.slow
def test_actors_place_rows_as_configured_and_status_shows_them(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gpu_node = nodes.add_node(num_cpus=1, num_gpus=2, resources={"fake_gpu": 2})
    host_node = nodes.add_node(num_cpus=1, resources={"store": 2})
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace="kstore", logging_level="ERROR", log_to_driver=False)
    try:
        cfg = ClusterConfig(store_root=str(tmp_path / "store"), num_shards=3,
                            shard=ShardResources(num_cpus=0.25, custom={"store": 1}, rows="host"),
                            shard_overrides={"0": {"num_gpus": 0.5, "custom": {"fake_gpu": 1}, "rows": "auto"},
                                             "1": {"num_gpus": 0.5, "custom": {"fake_gpu": 1}, "rows": "auto"}})
        table_cfg = TableConfig(d_k=8, d_v=16, segments=[("flat", 90)], value_dtype="bfloat16",
                                optimizer={"kind": "rowwise_adagrad"})
        cluster = StoreCluster.start(cfg, table_cfg)
        status = cluster.status()
        m = cluster.shard_map()
        assert [m.entries[i].node_id for i in range(3)] == [gpu_node.node_id, gpu_node.node_id, host_node.node_id]
        mem = [s["memory"] for s in status["shards"]]
        # two fractional stand-in GPUs share GPU 0 or take 0 and 1; CUDA is absent: host rows, said so
        assert all(len(x["gpu_ids"]) == 1 for x in mem[:2]) and mem[2]["gpu_ids"] == []
        assert all(x["device"] == "cpu" for x in mem) and "not available" in mem[0]["note"]
        assert [m.entries[i].device for i in range(3)] == ["cpu"] * 3
        assert all(x["value_bytes"] == (x["rows"] * 16 * 2) and x["rows"] == 30 for x in mem)
        # rows and flat keys: one fp32 accumulator and one int64 step count each
        assert all(x["optimizer"] == "rowwise_adagrad" and x["optimizer_bytes"] == 2 * 30 * (4 + 8) for x in mem)
        table = cluster.table()
        try:
            assert table.fetch(torch.arange(90)).shape == (90, 16)
        finally:
            table.close()
        cluster.stop()
    finally:
        ray.shutdown()
        nodes.shutdown()
