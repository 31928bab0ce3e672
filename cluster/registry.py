"""The registry: one named Ray actor that holds the versioned shard map.

Shard actors register their gRPC address when they (re)start; the scaler
publishes a whole new map at once. Workers read the map and rebuild their
client when `map_version` moves. The registry keeps no tensors and does no
I/O: losing it loses nothing that the shards cannot re-register.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field

import ray

REGISTRY_NAME = "kstore_registry"
NAMESPACE = "kstore"


@dataclass(frozen=True)
class ShardEntry:
    shard_id: int
    address: str
    row_start: int
    row_end: int
    version: int
    node_id: str = ""
    pid: int = 0
    device: str = ""          # where the shard's rows live ("cuda:0" inside its actor, "cpu")


@dataclass
class ShardMap:
    map_version: int = 0      # the layout generation: bumped when the shard set is replaced (scaling)
    revision: int = 0         # bumped on every change (a restarted shard's new address, a swap)
    table_version: int = 0
    num_shards: int = 0
    entries: dict[int, ShardEntry] = field(default_factory=dict)

    def complete(self) -> bool:
        return self.num_shards > 0 and sorted(self.entries) == list(range(self.num_shards))

    def addresses(self) -> list[str]:
        return [self.entries[i].address for i in range(self.num_shards)]

    def to_dict(self) -> dict:
        return {"map_version": self.map_version, "revision": self.revision,
                "table_version": self.table_version,
                "num_shards": self.num_shards,
                "entries": [asdict(self.entries[i]) for i in sorted(self.entries)]}

    @staticmethod
    def from_dict(d: dict) -> "ShardMap":
        entries = {e["shard_id"]: ShardEntry(**e) for e in d["entries"]}
        return ShardMap(d["map_version"], d["revision"], d["table_version"], d["num_shards"], entries)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class Registry:
    """A threaded actor, so that `wait_for` can block without stalling registrations."""

    def __init__(self):
        self._map = ShardMap()
        self._changed = threading.Condition()

    def expect(self, num_shards: int, table_version: int) -> int:
        """Start a new map generation of `num_shards` shards at `table_version`;
        shard actors of that generation then register into it."""
        with self._changed:
            self._map = ShardMap(self._map.map_version + 1, self._map.revision + 1, table_version,
                                 num_shards, {})
            self._changed.notify_all()
            return self._map.map_version

    def register(self, entry: dict, map_version: int) -> int:
        """A shard actor (re)announces itself. Registrations for an older map
        generation are ignored (a shard of a retired layout restarting late)."""
        with self._changed:
            if map_version != self._map.map_version:
                return self._map.map_version
            self._map.entries[entry["shard_id"]] = ShardEntry(**entry)
            self._map.revision += 1
            self._map.table_version = max(self._map.table_version, entry["version"])
            self._changed.notify_all()
            return self._map.map_version

    def set_table_version(self, version: int) -> None:
        with self._changed:
            self._map.table_version = version
            self._map.entries = {i: ShardEntry(**{**asdict(e), "version": version})
                                 for i, e in self._map.entries.items()}
            self._map.revision += 1
            self._changed.notify_all()

    def get_map(self) -> dict:
        with self._changed:
            return self._map.to_dict()

    @ray.method(max_task_retries=0)  # a long poll: the caller polls again, no retry after a kill
    def wait_for(self, min_map_version: int = 0, complete: bool = True, timeout_s: float = 60.0,
                 min_revision: int = 0) -> dict:
        """Block until the map reaches `min_map_version` / `min_revision` and
        (optionally) every shard has registered; returns the map either way."""
        def ready() -> bool:
            m = self._map
            if m.map_version < min_map_version or m.revision < min_revision:
                return False
            return not complete or m.complete()

        with self._changed:
            self._changed.wait_for(ready, timeout=timeout_s)
            return self._map.to_dict()


def get_or_create_registry():
    return Registry.options(name=REGISTRY_NAME, namespace=NAMESPACE, get_if_exists=True,
                            lifetime="detached", max_concurrency=16).remote()


def get_registry():
    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
