"""Settings of the bulk data path, each beside a default that the benchmarks of issue 21 run
under (fetches of 100k rows of 1024 bfloat16 = 210 MB through a 256 MiB buffer in 4 slots)."""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("cuda_ipc", "shm", "torch_dist")   # the client's order of preference; gRPC is the fallback after them


@dataclass(frozen=True)
class ClientConfig:
    """What a client asks for.

    kinds: transports to try, in order (the first one the shard grants is used).
    buffer_bytes / slots: the staging buffer asked for and the pieces it is cut in; one
    call moves at most one slot's bytes, a larger tensor goes as several pieces in flight.
    host_id: this host's id (default: `hostid.host_id()`); same-host kinds need the
    shard's to match. dist_backend: "gloo" (rows in host memory) or "nccl" (on a GPU).
    timeout_s: deadline of one call; retries: how many times a stale-step read is redone.
    device: where shm results land: "cpu", or a GPU ("cuda:0"), for which the mapping is
    page-locked and rows go straight from shared memory to the GPU (cuda_ipc results are on
    the shard's GPU, torch_dist gloo results on the CPU). lease: pin the version of a read of
    several pieces (store_service/leases.py); off: the pre-lease behaviour (benchmarks)."""
    kinds: tuple[str, ...] = KINDS
    buffer_bytes: int = 256 << 20
    slots: int = 4
    host_id: str = ""
    dist_backend: str = "gloo"
    timeout_s: float = 30.0
    retries: int = 3
    device: str = "cpu"
    lease: bool = True


@dataclass(frozen=True)
class ServerLimits:
    """What a shard grants: bounds on every session it hands out.

    max_sessions: open sessions at once (the oldest idle one is dropped for a new one).
    max_buffer_bytes: cap of one staging buffer. max_call_bytes: the most bytes one call
    moves over dist (shm and cuda_ipc are bounded by their buffer). idle_s: a session
    unused this long may be dropped. ticket_ttl_s: how long a ticket stays redeemable.
    group_timeout_s: how long a dist session waits for its client to join, and for a
    send or receive to complete, before the group is given up."""
    max_sessions: int = 64
    max_buffer_bytes: int = 1 << 30
    max_call_bytes: int = 1 << 30
    idle_s: float = 3600.0
    ticket_ttl_s: float = 30.0
    group_timeout_s: float = 60.0
