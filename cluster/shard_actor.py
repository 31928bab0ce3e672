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


def rows_device(rows: str, gpu_ids: list, cuda_available: bool) -> dict:
    """Where a shard actor keeps its rows: {"device", "pin_memory", "gpu_ids", "note"}.
    Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave the actor, so the first of them is
    cuda:0 inside the actor (a fractional GPU too). rows "auto" takes that GPU when CUDA can
    use it and falls back to host memory otherwise (a node that declares GPUs this
    process cannot drive); "gpu" insists; "host" keeps the rows in host memory,
    page-locked where CUDA exists."""
    gpu_ids = [str(g) for g in gpu_ids]
    if rows == "gpu" or (rows == "auto" and gpu_ids and cuda_available):
        if not gpu_ids:
            raise RuntimeError("rows = 'gpu' but Ray gave this shard actor no GPU (set num_gpus > 0)")
        if not cuda_available:
            raise RuntimeError(f"rows = 'gpu': Ray gave GPUs {gpu_ids}, but CUDA is not available here")
        return {"device": "cuda:0", "pin_memory": False, "gpu_ids": gpu_ids, "note": ""}
    if rows not in ("auto", "host"):
        raise ValueError(f"rows must be 'auto', 'gpu' or 'host', got {rows!r}")
    note = f"GPUs {gpu_ids} assigned but CUDA is not available: rows in host memory" if gpu_ids else ""
    return {"device": "cpu", "pin_memory": cuda_available, "gpu_ids": gpu_ids, "note": note}


@ray.remote(max_restarts=-1, max_task_retries=0)
class ShardActor:
    def __init__(self, store_root: str, shard_id: int, num_shards: int, base_version: int,
                 map_version: int, admin_token: str, bind_host: str = "127.0.0.1",
                 torch_threads: int = 1, metrics: bool = True, rows: str = "auto",
                 tokens: dict | None = None):
        import torch

        from store_service.auth import Tokens
        from store_service.server import serve_shard
        from store_service.shard import Shard

        torch.set_num_threads(torch_threads)
        self.shard_id = shard_id
        version = self._version_to_load(store_root, num_shards, base_version, map_version)
        self.placement = rows_device(rows, ray.get_gpu_ids(), torch.cuda.is_available())
        self.shard = Shard.load(store_root, version, shard_id, self.placement["device"],
                                self.placement["pin_memory"])
        self.server = serve_shard(self.shard, port=0, tokens=Tokens(**tokens) if tokens else Tokens(admin_token),
                                  host=bind_host,
                                  metrics_port=0 if metrics else None)
        info = self.shard.describe().info
        self.entry = {"shard_id": shard_id, "address": self.server.address, "row_start": info.row_start,
                      "row_end": info.row_end, "version": info.version,
                      "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                      "device": self.placement["device"]}
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

    def memory(self) -> dict:
        """Where the rows live and the bytes held (Shard.memory), with the GPUs Ray gave."""
        return {**self.shard.memory(), "gpu_ids": self.placement["gpu_ids"], "note": self.placement["note"]}

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop(grace=2.0)
