"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): a head, a
"store" node and a "worker" node. Shard actors and workers land where their
resources say, and the worker reaches the shards over gRPC."""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.config import ClusterConfig, ShardResources  # noqa: E402
from cluster.launch import StoreCluster  # noqa: E402
from cluster.worker_actor import WorkerActor  # noqa: E402
from store_service.config import TableConfig  # noqa: E402


@ray.remote(num_cpus=0)
def _remote_search(admin_token: str, store_root: str) -> tuple[str, list]:
    from cluster.following_table import FollowingTable
    table = FollowingTable(admin_token=admin_token, store_root=store_root)
    try:
        res = table.search(torch.ones(2, 8), 3)
        return ray.get_runtime_context().get_node_id(), res.ids.tolist()
    finally:
        table.close()


@pytest.mark.slow
def test_shards_and_workers_land_on_their_nodes(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    store_node = nodes.add_node(num_cpus=2, resources={"store": 4})
    worker_node = nodes.add_node(num_cpus=1, resources={"worker": 1})
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace="kstore", logging_level="ERROR", log_to_driver=False)
    try:
        cfg = ClusterConfig(store_root=str(tmp_path / "store"), num_shards=2,
                            shard=ShardResources(num_cpus=0.5, custom={"store": 1}),
                            worker=ShardResources(num_cpus=0.5, custom={"worker": 0.5}))
        cluster = StoreCluster.start(cfg, TableConfig(d_k=8, d_v=16, segments=[("flat", 64)]))
        m = cluster.shard_map()
        assert {e.node_id for e in m.entries.values()} == {store_node.node_id}

        worker = WorkerActor.options(**cfg.worker.ray_options()).remote(cfg.admin_token)
        assert ray.get(worker.node_id.remote()) == worker_node.node_id

        node, ids = ray.get(_remote_search.options(resources={"worker": 0.5}).remote(
            cfg.admin_token, cfg.store_root))
        assert node == worker_node.node_id and len(ids) == 2 and len(ids[0]) == 3
        cluster.stop()
    finally:
        ray.shutdown()
        nodes.shutdown()
