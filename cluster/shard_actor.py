"""A shard as a Ray actor: loads its rows from the last published Zarr
version of its layout, serves them over gRPC on its node, and registers its
address with the registry. Ray restarts it if it dies (`max_restarts=-1`):
the constructor runs again, reloads the last published version and
re-registers, and clients follow the registry to the new address.
"""
from __future__ import annotations

import logging
import os

import ray

from .registry import get_registry

log = logging.getLogger(__name__)


def latest_version_with_layout(store_root: str, num_shards: int, at_least: int) -> int:
    """The newest published version >= at_least that has num_shards shards."""
    from store_service import persistence

    for v in sorted(persistence.list_versions(store_root), reverse=True):
        if v < at_least:
            break
        if len(persistence.read_root_attrs(store_root, v)["shards"]) == num_shards:
            return v
    raise FileNotFoundError(f"no published version >= {at_least} with {num_shards} shards under {store_root}")


@ray.remote(max_restarts=-1, max_task_retries=0)
class ShardActor:
    def __init__(self, store_root: str, shard_id: int, num_shards: int, base_version: int,
                 map_version: int, admin_token: str, bind_host: str = "127.0.0.1",
                 torch_threads: int = 1, metrics: bool = True, tokens: dict | None = None):
        import torch

        from store_service.auth import Tokens
        from store_service.server import serve_shard
        from store_service.shard import Shard

        torch.set_num_threads(torch_threads)
        self.shard_id = shard_id
        version = self._version_to_load(store_root, num_shards, base_version, map_version)
        self.shard = Shard.load(store_root, version, shard_id)
        self.server = serve_shard(self.shard, port=0, tokens=Tokens(**tokens) if tokens else Tokens(admin_token),
                                  host=bind_host,
                                  metrics_port=0 if metrics else None)
        info = self.shard.describe().info
        self.entry = {"shard_id": shard_id, "address": self.server.address, "row_start": info.row_start,
                      "row_end": info.row_end, "version": info.version,
                      "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        log.info("shard %d %s version %d at %s", shard_id, "restarted with" if restarted else "serving",
                 version, self.server.address)
        ray.get(get_registry().register.remote(self.entry, map_version))

    @staticmethod
    def _version_to_load(store_root: str, num_shards: int, base_version: int, map_version: int) -> int:
        """The version the rest of the table serves (a restart must not mix
        versions), else the newest published one of this layout."""
        from store_service import persistence

        m = ray.get(get_registry().get_map.remote())
        v = m["table_version"]
        if m["map_version"] == map_version and v >= base_version and v in persistence.list_versions(store_root) \
                and len(persistence.read_root_attrs(store_root, v)["shards"]) == num_shards:
            return v
        return latest_version_with_layout(store_root, num_shards, base_version)

    def entry_(self) -> dict:
        return dict(self.entry, metrics_port=self.server.metrics_port)

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop(grace=2.0)
