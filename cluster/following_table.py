"""A client table that follows the registry's shard map.

The store's `Table` talks to a fixed list of shards. In the cluster, the list
changes: the store is scaled onto a new set of shard actors, or Ray restarts
a dead shard on a new port. `FollowingTable` watches the registry from a
background thread (one blocking Ray call, no polling on the hot path) and
rebinds to the new shards between operations.

A restarted shard has lost what it held in memory since the last published
version. Read-only users (generation) simply follow it; a trainer must not
silently continue on rolled-back rows, so with `on_restart="raise"` the table
raises `ShardRestarted` and the trainer recovers from its last checkpoint.
"""
from __future__ import annotations

import logging
import threading
import time

import ray

from store_service import errors
from store_service.client import RemoteShard
from store_service.table import Table

from .registry import ShardMap, get_registry

log = logging.getLogger(__name__)


class ShardRestarted(errors.StoreError):
    """A shard of the current layout came back from a restart: rows it held in
    memory since the last published version are gone."""


class FollowingTable(Table):
    def __init__(self, *, admin_token: str, on_restart: str = "follow", timeout_s: float = 30.0,
                 wait_s: float = 60.0, **table_kwargs):
        if on_restart not in ("follow", "raise"):
            raise ValueError(f"on_restart must be 'follow' or 'raise', got {on_restart!r}")
        self._registry = get_registry()
        self._admin_token = admin_token
        self._client_root = table_kwargs.get("store_root")   # admin paths travel relative to it
        self._timeout_s = timeout_s
        self._wait_s = wait_s
        self.on_restart = on_restart
        self._rebind_lock = threading.Lock()
        self._latest: ShardMap | None = None
        shard_map = ShardMap.from_dict(ray.get(self._registry.wait_for.remote(complete=True, timeout_s=wait_s)))
        if not shard_map.complete():
            raise errors.FailedPrecondition(f"the registry's shard map is incomplete: {shard_map.to_dict()}")
        self._bound = shard_map
        super().__init__(self._handles(shard_map), **table_kwargs)
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="kstore-map-watch", daemon=True)
        self._watcher.start()

    # -- following the registry -------------------------------------------------

    def _handles(self, m: ShardMap) -> list[RemoteShard]:
        return [RemoteShard(e.address, admin_token=self._admin_token, timeout_s=self._timeout_s,
                            shard_id=e.shard_id, store_root=self._client_root) for e in (m.entries[i] for i in range(m.num_shards))]

    def _watch(self) -> None:
        seen = self._bound.revision
        while not self._closed.is_set():
            try:
                d = ray.get(self._registry.wait_for.remote(min_revision=seen + 1, complete=True, timeout_s=2.0))
            except Exception:  # the registry restarting, or Ray going down at exit
                time.sleep(0.5)
                continue
            m = ShardMap.from_dict(d)
            if m.revision > seen and m.complete():
                seen = m.revision
                self._latest = m

    def _restarted(self, new: ShardMap) -> bool:
        """Same layout, but some shard now answers from a new process."""
        old = self._bound
        return new.map_version == old.map_version and any(
            new.entries[i].pid != old.entries[i].pid for i in range(new.num_shards))

    def sync(self, wait_for_change: bool = False) -> None:
        """Rebind to the registry's newest complete map. With wait_for_change,
        first block until it differs from the bound one (after a shard failed)."""
        if wait_for_change:
            deadline = time.monotonic() + self._wait_s
            while time.monotonic() < deadline:
                m = self._latest
                if m is not None and m.revision > self._bound.revision:
                    break
                time.sleep(0.05)
        with self._rebind_lock:
            m = self._latest
            if m is None or m.revision <= self._bound.revision:
                return
            restarted = self._restarted(m)
            # A restarted shard serves the last published version; the caller
            # restores a checkpoint before the map is described again.
            old_shards = self.rebind(self._handles(m), refresh=False)
            self._bound = m
            for s in old_shards:
                s.close()
            log.info("following shard map generation %d revision %d (%d shards)%s", m.map_version,
                     m.revision, m.num_shards, ", a shard restarted" if restarted else "")
            if restarted and self.on_restart == "raise":
                raise ShardRestarted(f"a shard restarted (map revision {m.revision}); "
                                     "rows it held since the last published version are lost")
            self.refresh()

    def _retrying(self, op):
        if self._latest is not None and self._latest.revision > self._bound.revision:
            self.sync()
        try:
            return super()._retrying(op)
        except errors.ShardUnavailable as e:
            log.warning("%s; waiting for the registry to show its replacement", e)
            self.sync(wait_for_change=True)
            return super()._retrying(op)

    def close(self) -> None:
        self._closed.set()
        # Wait for the watcher's registry call (it returns within ~2 s): a thread still in
        # a Ray call when the process exits makes Ray end the process with code 1.
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=30.0)
        super().close()
        for s in self.shards:
            s.close()
