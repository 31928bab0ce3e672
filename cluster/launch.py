"""Start, inspect, scale, hot-swap and stop a store cluster on Ray.

    cluster = StoreCluster.start(ClusterConfig(num_shards=2), table_config)
    table = cluster.table()                 # a FollowingTable: the model's KnowledgeTable
    cluster.scale(4)                        # re-partition onto 4 shard actors, publish the new map
    cluster.swap(version)                   # hot-swap every shard to a published version
    cluster.stop()

Shards are Ray actors (cluster.shard_actor); their map lives in the registry
actor (cluster.registry). Everything that touches rows goes through the
store's gRPC API; this module only places actors and publishes maps.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import ray

from store_service import errors, persistence, versions
from store_service.client import RemoteShard
from store_service.config import TableConfig

from .config import ClusterConfig
from .following_table import FollowingTable
from .registry import NAMESPACE, ShardMap, get_or_create_registry
from .shard_actor import ShardActor, latest_version_with_layout

log = logging.getLogger(__name__)

# Deadline of each call a scale or swap makes to a shard: a shard preparing a version reads and
# places its whole share of the table (8.6 GB per shard of a 16M x 1024 bf16 table over 4 shards,
# tens of seconds from a cold disk), and a scale's snapshot writes it; a client's 30 s would fail them.
ADMIN_TIMEOUT_S = 600.0


_owns_ray = False


def init_ray(config: ClusterConfig, log_to_driver: bool = False) -> bool:
    """Connect to (or embed) a Ray cluster. Returns True if this process started
    (and so should stop) it. log_to_driver shows the actors' output and progress bars."""
    global _owns_ray
    if ray.is_initialized():
        return _owns_ray
    if config.ray_address:
        _token_auth_for_explicit_address()
        ray.init(address=config.ray_address, namespace=NAMESPACE, logging_level="ERROR",
                 log_to_driver=log_to_driver)
    else:
        # More logical CPUs than cores: the shard actors mostly wait on gRPC.
        ray.init(namespace=NAMESPACE, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=log_to_driver, num_cpus=max(os.cpu_count() or 2, 4))
        _owns_ray = True
    return _owns_ray


def _token_auth_for_explicit_address() -> None:
    """Ray turns token authentication on by itself where a token exists (~/.ray/auth_token):
    for a head it starts and for `ray.init("auto")`, but not for an explicit address.
    Do as it does there, so that `kstore` reaches the head `kstore up` started."""
    if "RAY_AUTH_MODE" not in os.environ and os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        os.environ["RAY_AUTH_MODE"] = "token"
        try:   # Ray reads its settings once; this is how its own code re-reads them after setting the mode
            from ray._raylet import Config
            Config.initialize("")
        except (ImportError, AttributeError):  # a Ray without token authentication
            pass


@dataclass
class StoreCluster:
    config: ClusterConfig
    registry: object
    actors: list = field(default_factory=list)
    map_version: int = 0
    owns_ray: bool = False

    # -- start -------------------------------------------------------------------

    @classmethod
    def start(cls, config: ClusterConfig, table_config: TableConfig | None = None) -> "StoreCluster":
        """Publish an initial version if the store root has none (from table_config),
        re-partition it if its shard count differs from config.num_shards, and
        start one shard actor per shard."""
        owns = init_ray(config)
        os.makedirs(config.store_root, exist_ok=True)
        config.ensure_tokens()
        version = persistence.latest_version(config.store_root)
        if version is None:
            if table_config is None:
                raise FileNotFoundError(f"no published version under {config.store_root}; "
                                        "give a table config to create one")
            from store_service.table import Table
            from dataclasses import replace
            table = Table.create(replace(table_config, num_shards=config.num_shards), config.store_root)
            version = table.snapshot()
            table.close()
        if len(persistence.read_root_attrs(config.store_root, version)["shards"]) != config.num_shards:
            version = versions.repartition(config.store_root, version, config.num_shards)
        cluster = cls(config, get_or_create_registry(), owns_ray=owns)
        try:
            cluster._start_generation(version, config.num_shards)
        except BaseException:
            cluster.stop()   # a failed start leaves no actor, registry or embedded Ray behind
            raise
        return cluster

    def _start_generation(self, version: int, num_shards: int) -> list:
        gen = ray.get(self.registry.expect.remote(num_shards, version))
        # Detached: a shard belongs to the cluster, not to the process that started it
        # (a command line, or a worker that scales the store mid-run); stop() ends it.
        actors = []
        for i in range(num_shards):
            res = self.config.shard_resources(i)
            actors.append(ShardActor.options(name=f"kstore_shard_g{gen}_{i}", lifetime="detached",
                                             **res.ray_options()).remote(
                os.path.abspath(self.config.store_root), i, num_shards, version, gen, self.config.admin_token,
                rows=res.rows, tokens=dataclasses.asdict(self.config.tokens())))
        self.actors = self.actors + actors   # stop() reaches them even if they never register
        m = ShardMap.from_dict(ray.get(self.registry.wait_for.remote(min_map_version=gen, complete=True,
                                                                    timeout_s=120.0)))
        if m.map_version != gen or not m.complete():
            raise RuntimeError(f"shard actors of generation {gen} did not all register within 120 s "
                               f"(do the cluster's resources fit [shard] in the config?): {m.to_dict()}")
        self.actors, self.map_version = actors, gen
        return actors

    # -- clients -----------------------------------------------------------------

    def table(self, on_restart: str = "follow", **kwargs) -> FollowingTable:
        return FollowingTable(admin_token=self.config.admin_token, on_restart=on_restart,
                              store_root=os.path.abspath(self.config.store_root), **kwargs)

    def shard_map(self) -> ShardMap:
        return ShardMap.from_dict(ray.get(self.registry.get_map.remote()))

    def status(self) -> dict:
        """Shards (address, node, rows, version, step, health) and row usage."""
        m = self.shard_map()
        shards = []
        for i in range(m.num_shards):
            e = m.entries[i]
            rs = RemoteShard(e.address, admin_token=self.config.admin_token, timeout_s=10.0, shard_id=i)
            try:
                d = rs.describe()
                u = rs.usage()
                shards.append({"shard": i, "address": e.address, "node": e.node_id[:12], "pid": e.pid,
                               "rows": [d.info.row_start, d.info.row_end], "version": d.info.version,
                               "step": d.info.step, "healthy": rs.health(),
                               "rows_used": int((u.hits > 0).sum()), "frozen": int(u.frozen.sum()),
                               "ablated": int(u.ablated.sum()), "memory": self._shard_memory(i)})
            finally:
                rs.close()
        return {"map_version": m.map_version, "revision": m.revision, "table_version": m.table_version,
                "published_versions": persistence.list_versions(self.config.store_root), "shards": shards}

    def _shard_memory(self, i: int) -> dict | None:
        """Where shard i's rows live and the bytes it holds (ShardActor.memory); None when
        this handle does not know the actor (a layout newer than it)."""
        if i >= len(self.actors):
            return None
        try:
            return ray.get(self.actors[i].memory.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - status reports, it does not fail
            return {"error": str(e)[:200]}

    # -- operations ----------------------------------------------------------------

    def scale(self, num_shards: int, *, drain_s: float = 2.0) -> int:
        """Re-partition the serving rows onto `num_shards` new shard actors.

        The serving state is published first (so nothing trained is lost), then
        re-partitioned into a new version, served by a new generation of actors;
        clients follow the registry to it, and the old actors are stopped once
        clients have had `drain_s` to move. Call it between training steps.
        Returns the new version."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        table = self.table(timeout_s=ADMIN_TIMEOUT_S)
        try:
            version = table.snapshot()
        finally:
            table.close()
        new_version = versions.repartition(self.config.store_root, version, num_shards)
        old = self.actors
        self._start_generation(new_version, num_shards)
        time.sleep(drain_s)
        _stop_actors(old)
        return new_version

    def swap(self, version: int, shard: int | None = None) -> int:
        """Hot-swap to a published version through the admin API, while serving.

        shard=None swaps the whole table. With a shard id, only that shard's
        rows come from `version`: a new version is composed (that shard from
        `version`, the others from the serving one) and the whole table swaps
        to it, so every answer still comes wholly from one version.
        A version with another shard count is re-partitioned onto the serving
        shards first (a new version, the same rows); one shard of it cannot be.
        Returns the version now serving."""
        m = self.shard_map()
        published = persistence.list_versions(self.config.store_root)
        if version not in published:
            raise errors.NotFound(f"no published version {version} under {self.config.store_root}; "
                                  f"published: {published}")
        held = len(persistence.read_root_attrs(self.config.store_root, version)["shards"])
        if shard is not None:
            if held != m.num_shards:
                raise errors.FailedPrecondition(
                    f"version {version} has {held} shards and the cluster serves {m.num_shards}, so shard "
                    f"{shard} holds other rows in each; swap the whole table (--version {version} without "
                    f"--shard) or `kstore scale {held}` first")
            version = versions.compose_version(self.config.store_root, m.table_version, {shard: version})
        elif held != m.num_shards:
            # the serving actors keep their number: the version's rows are re-partitioned onto them
            version = versions.repartition(self.config.store_root, version, m.num_shards)
        table = self.table(timeout_s=ADMIN_TIMEOUT_S)
        try:
            table.load_version(version)
        finally:
            table.close()
        ray.get(self.registry.set_table_version.remote(version))
        return version

    def kill_shard(self, shard: int) -> int:
        """Kill a shard's process (as a crash would); Ray restarts it. Returns the dead pid."""
        pid = self.shard_map().entries[shard].pid
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """Stop every shard actor of the current layout (whoever started it) and the registry."""
        try:
            current = attach(self.config).actors
        except Exception:  # the registry is gone already
            current = []
        _stop_actors(list({a._actor_id: a for a in self.actors + current}.values()))
        self.actors = []
        try:
            ray.kill(self.registry, no_restart=True)
        except Exception:
            pass
        if self.owns_ray:
            ray.shutdown()


def _stop_actors(actors: list) -> None:
    for a in actors:
        try:
            ray.get(a.stop.remote(), timeout=10)
        except Exception:
            pass
        ray.kill(a, no_restart=True)


def attach(config: ClusterConfig) -> StoreCluster:
    """A handle on a running cluster (for the command line): its registry and actors."""
    init_ray(config)
    from .registry import get_registry
    registry = get_registry()
    m = ShardMap.from_dict(ray.get(registry.get_map.remote()))
    actors = [ray.get_actor(f"kstore_shard_g{m.map_version}_{i}", namespace=NAMESPACE)
              for i in range(m.num_shards)]
    return StoreCluster(config, registry, actors, m.map_version)


__all__ = ["StoreCluster", "attach", "init_ray", "latest_version_with_layout"]
