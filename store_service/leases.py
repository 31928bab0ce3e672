"""Pinned-version leases: a read of several pieces finishes on the version it started on.

A multi-piece read (a gRPC fetch split over the channel pool, a read through a staging
buffer in pieces) takes a lease on one version (`Shard.lease_version`), names it in every
piece and releases it at the end. A piece naming a lease is answered by the state the lease
pins or gets StaleVersion (the lease ended, or its state was relabelled): never by another
state that its number names by then. A hot swap's `release_version` then drops that version's
state only once its leases are released or expired; until then the state stays alive as
*retired*, reachable only through a lease: a request naming it without one still gets
StaleVersion (so a stale client refreshes, and no gradient lands on a version nobody serves).

Bounds, so that a hostile or dead client cannot keep old versions alive:
- a lease lives at most `ttl_s` from its grant (a deadline, not renewed by use);
- at most `max_per_holder` live leases per holder (a transport session, or a gRPC connection)
  and `max_total` per shard; more are refused (ResourceExhausted: the caller reads without one);
- at most `max_retired` (1) retired versions are kept beyond the serving one (and the prepared
  or retiring one of a swap in progress). A release that would keep one more waits up to `wait_s`
  for the oldest retired version's leases to end (released or expired), then revokes them: that
  version is dropped, and its readers' next piece gets StaleVersion (they read it all again, on
  the serving version); while the release waits both are held, at most wait_s. New leases are
  only granted on reachable versions, never a retired one;
- a holder that goes away has its leases dropped at once (`drop_holder`: a transport session is
  closed when its client closes it or its process dies); a gRPC caller's lapse at their deadline.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import errors


@dataclass(frozen=True)
class LeasePolicy:
    ttl_s: float = 30.0        # the longest a lease lives (a caller asks for less)
    max_per_holder: int = 16
    max_total: int = 256
    max_retired: int = 1       # retired versions kept for their leases, beyond the serving one
    wait_s: float = 10.0       # how long a release waits for the oldest retired version before revoking it


@dataclass
class Lease:
    id: str
    holder: str
    deadline: float
    state: Any                 # the ShardState it pins


class VersionLeases:
    """The leases of one shard and the retired states they keep. Every method but `_expire`
    is called with the shard's version lock held (`cond` is its condition)."""

    def __init__(self, cond: threading.Condition, on_drop: Callable[[], None] | None = None,
                 policy: LeasePolicy = LeasePolicy()):
        self.policy = policy
        self._cond = cond
        self._on_drop = on_drop        # called without the lock after retired states were dropped
        self._leases: dict[str, Lease] = {}
        self.retired: list = []        # flipped away and released, kept alive for their leases
        self._timers: dict[int, threading.Timer] = {}   # id(retired state) -> its expiry
        self.revoked = 0               # leases revoked to keep the bound (tests, benchmarks)

    def _purge(self, now: float) -> None:
        for lid in [lid for lid, le in self._leases.items() if le.deadline <= now]:
            del self._leases[lid]

    def _pinned(self, state) -> list[Lease]:
        return [le for le in self._leases.values() if le.state is state]

    def grant(self, state, holder: str, ttl_s: float) -> Lease:
        if not (isinstance(ttl_s, (int, float)) and 0 < ttl_s < float("inf")):
            raise errors.InvalidArgument("ttl_s", f"must be finite and > 0, got {ttl_s}")
        now = time.monotonic()
        self._purge(now)
        mine = sum(1 for le in self._leases.values() if le.holder == holder)
        if mine >= self.policy.max_per_holder or len(self._leases) >= self.policy.max_total:
            raise errors.ResourceExhausted("max_leases", f"{mine} leases held by this caller, {len(self._leases)} "
                                           f"by all (limits {self.policy.max_per_holder} / {self.policy.max_total})")
        lease = Lease(secrets.token_hex(16), holder, now + min(float(ttl_s), self.policy.ttl_s), state)
        self._leases[lease.id] = lease
        return lease

    def find(self, version: int, lease_id: str):
        """The state the live lease `lease_id` pins, if it is still labelled `version` (0: any
        label), else None: the lease ended, or its state was relabelled (store_service/labels.py),
        so `version` may name another state now and the caller must read all again."""
        le = self._leases.get(lease_id)
        if le is None or version not in (0, le.state.version) or le.deadline <= time.monotonic():
            return None
        return le.state

    def versions(self) -> list[int]:
        """The version of every live lease (one entry each)."""
        self._purge(time.monotonic())
        return sorted(le.state.version for le in self._leases.values())

    def release(self, lease_id: str) -> bool:
        """-> whether a retired state was dropped."""
        self._leases.pop(lease_id, None)
        return self._reap()

    def drop_holder(self, holder: str) -> bool:
        for lid in [lid for lid, le in self._leases.items() if le.holder == holder]:
            del self._leases[lid]
        return self._reap()

    def forget(self, state) -> None:
        """A state dropped otherwise (a prepared version never flipped): its leases go with it."""
        for le in self._pinned(state):
            del self._leases[le.id]

    def _reap(self) -> bool:
        self._purge(time.monotonic())
        kept = [s for s in self.retired if self._pinned(s)]
        dropped = len(kept) != len(self.retired)
        self.retired = kept
        for key in set(self._timers) - {id(s) for s in kept}:
            self._timers.pop(key).cancel()
        if dropped:
            self._cond.notify_all()
        return dropped

    def retire(self, states: list) -> None:
        """States a release makes unreachable: those still leased are kept (retired), the rest
        go. Keeps the bound: waits up to wait_s for the oldest retired state's leases to end,
        then revokes them."""
        now = time.monotonic()
        self._purge(now)
        for st in states:
            pins = self._pinned(st)
            if pins:
                self.retired.append(st)
                timer = self._timers[id(st)] = threading.Timer(max(le.deadline for le in pins) - now + 0.01,
                                                              self._expire)
                timer.daemon = True
                timer.start()
        give_up = now + self.policy.wait_s
        while True:
            self._reap()
            if len(self.retired) <= self.policy.max_retired:
                break
            oldest = self.retired[0]
            now = time.monotonic()
            if now >= give_up:
                self.revoked += len(self._pinned(oldest))
                self.forget(oldest)   # the next _reap drops it
                continue
            expires = min(le.deadline for le in self._pinned(oldest))
            self._cond.wait(max(0.001, min(give_up, expires) - now))

    def _expire(self) -> None:
        """A retired state's last lease reached its deadline: drop it now, not at the next call."""
        with self._cond:
            dropped = self._reap()
        if dropped and self._on_drop is not None:
            self._on_drop()
