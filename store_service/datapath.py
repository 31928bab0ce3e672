"""The bulk data path seam: how rows, readouts and row gradients travel between a caller and
one shard server, chosen per pair of endpoints (benchmarks/WIRE_NOTES.md).

gRPC stays the control plane. The calls whose bytes grow with d_v (fetch, readout,
accumulate_value_grads, readout_backward's grad_out) go through a `DataPath`, picked once per (client, shard server):

    client                                 shard server (store_service.server)
    RemoteShard(data_paths=("shm", ...))
      --- OpenDataPath (authenticated gRPC) --->  for each kind the client offers, in order:
          kinds, client Endpoint, params           DataPathServer.open(client, params) -> params | None
      <--- kind + params (or kind "" = none) ---
    DataPathClient.connect(params) -> DataPath   (failure: log, fall back to gRPC)

`GrpcDataPath` (store_service.client) is the fallback every pair has. Other transports
(store_service/transport/: shared memory, CUDA IPC, torch.distributed) register themselves
with `register_transport`; `transports()` imports that package when it exists.

Rules every transport keeps:
- It calls the shard's own methods on the server side (`shard.fetch(ids, hits=,
  weight_sum=, version=)`, `shard.readout(...)`, `shard.accumulate_value_grads(...)`), so
  versions, usage, dedup by request_id and the step barrier stay the shard's: the shard is the
  only writer, gradients are applied at its end_step, and a swap never mixes versions.
- Results equal the gRPC path's bitwise (tests/store/test_datapath.py checks every registered kind).
- Domain errors raised by the shard reach the caller as the same class (`error_to_wire` /
  `error_from_wire` carry them over any channel); a dead or unreachable peer raises
  `errors.ShardUnavailable(shard_id, address, cause)`, as the gRPC path does.
- Handles (fds, IPC handles, rendezvous addresses) are handed out only by `open`, which runs
  inside the authenticated OpenDataPath call; a ticket they return is single-use.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from store_service import errors

log = logging.getLogger(__name__)

GRPC = "grpc"


@dataclass(frozen=True)
class Endpoint:
    """One side of a pair. host_id is equal on both sides exactly when they share a host
    (and its /dev/shm and GPUs): the hostname and the kernel's boot id."""
    host_id: str
    pid: int
    device: str  # server: where the shard's rows live; client: where it wants results ("cpu", "cuda:0")


def local_host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:  # pragma: no cover - not Linux
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def local_endpoint(device: str | torch.device = "cpu") -> Endpoint:
    return Endpoint(host_id=local_host_id(), pid=os.getpid(), device=str(device))


@runtime_checkable
class DataPath(Protocol):
    """The caller's end of one (client, shard server) pair. Tensors come back on the CPU
    unless the transport delivers to the caller's device (CUDA IPC); callers move them.
    Thread-safe: Table calls shards from an executor, and fetches may overlap gradients."""
    kind: str

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None, weight_sum: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, version: int = 0) -> torch.Tensor:
        """ids [M] int64 (this shard's) -> values [M, d_v] in out_dtype (None: the table's
        value dtype). hits/weight_sum: as ShardHandle.fetch (both or neither)."""

    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
                version: int = 0) -> torch.Tensor:
        """ids [T, k] (others' ids already -1), weights [T, k] float32 -> this shard's partial
        readout [T, d_v], summed in float32, returned in out_dtype."""

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str,
                               version: int = 0) -> None:
        """ids [M], grads [M, d_v] (float32 or bfloat16; the shard widens to float32)."""

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str, version: int = 0) -> torch.Tensor:
        """A pushdown readout's backward: grad_out [T, d_v] (float32 or bfloat16, the bulk
        payload) -> grad of weights [T, k] float32. The shard accumulates the row gradients
        (once per request_id) and applies them at its end_step, as over gRPC."""

    def close(self) -> None: ...


@runtime_checkable
class DataPathServer(Protocol):
    """A transport's end inside the shard server process, made once per server by its
    `Transport.server(shard)`; `open` is called once per client, inside OpenDataPath."""
    kind: str

    def open(self, client: Endpoint, server: Endpoint, params: Mapping[str, str]) -> dict[str, str] | None:
        """The parameters the client's `connect` needs (socket path, ticket, IPC handles,
        rendezvous address...), or None when this transport cannot serve that pair (e.g.
        another host). Raise a domain error for a bad request."""

    def close(self) -> None: ...


@runtime_checkable
class DataPathClient(Protocol):
    """A transport's end in the caller's process, made once per RemoteShard."""
    kind: str

    def params(self, client: Endpoint) -> dict[str, str]:
        """What the server's `open` needs from this client (sent in OpenDataPath)."""

    def connect(self, params: Mapping[str, str], *, shard_id: int, address: str, timeout_s: float,
                metadata: tuple = (), tls=None) -> DataPath:
        """Connect with what `open` returned; raise on failure (the caller falls back to gRPC).
        metadata: the caller's credentials, to send with every call it makes to the shard;
        tls: its store_service.tls.ClientTls (None: plaintext), for any channel it opens."""


@dataclass(frozen=True)
class Transport:
    """A registered transport. server(shard) -> DataPathServer; client() -> DataPathClient.
    available(): can this process use it at all (e.g. CUDA present for cuda_ipc)."""
    kind: str
    server: Callable[..., DataPathServer]
    client: Callable[[], DataPathClient]
    available: Callable[[], bool] = lambda: True


_REGISTRY: dict[str, Transport] = {}
_LOCK = threading.Lock()
_LOADED = False
TRANSPORT_PACKAGE = "store_service.transport"


def register_transport(transport: Transport) -> None:
    if transport.kind == GRPC or not transport.kind:
        raise ValueError(f"transport kind {transport.kind!r} is reserved")
    with _LOCK:
        _REGISTRY[transport.kind] = transport


def transports() -> dict[str, Transport]:
    """Every registered transport (importing store_service.transport once, if it exists)."""
    global _LOADED
    with _LOCK:
        load = not _LOADED
        _LOADED = True
    if load:
        try:
            importlib.import_module(TRANSPORT_PACKAGE)
        except ModuleNotFoundError as exc:
            if exc.name != TRANSPORT_PACKAGE:
                raise
    with _LOCK:
        return dict(_REGISTRY)


SAME_HOST_KINDS = ("cuda_ipc", "shm")      # fastest first


def available_kinds(wanted: Sequence[str] = SAME_HOST_KINDS) -> tuple[str, ...]:
    """Those of `wanted` (in its order) whose transport is registered and usable here: what a
    client on the shard's host asks for (default: the same-host kinds, fastest first)."""
    known = transports()
    return tuple(k for k in wanted if k in known and known[k].available())


def transport(kind: str) -> Transport:
    known = transports()
    if kind not in known:
        raise errors.InvalidArgument("data_paths", f"unknown transport {kind!r}; known: {sorted(known) or 'none'}"
                                                   f" besides {GRPC!r}")
    return known[kind]


# -- domain errors over a transport's own channel -------------------------------------

def error_to_wire(exc: BaseException) -> dict[str, str]:
    """A domain error (or any exception) -> strings a transport can carry."""
    out = {"class": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.InvalidArgument):
        prefix = f"{exc.field}: "
        out.update(field=exc.field, message=str(exc)[len(prefix):] if str(exc).startswith(prefix) else str(exc))
    elif isinstance(exc, errors.StaleVersion):
        out.update(requested=str(exc.requested), serving=str(exc.serving), reason=exc.reason)
    return out


def error_from_wire(d: Mapping[str, str], shard_id: int, address: str) -> errors.StoreError:
    """The inverse of error_to_wire: the same domain error class on the caller's side;
    anything else (a server bug) becomes ShardUnavailable, as INTERNAL does over gRPC."""
    cls, message = d.get("class", ""), d.get("message", "")
    if cls == "InvalidArgument":
        return errors.InvalidArgument(d.get("field", "request"), message)
    if cls == "StaleVersion":
        return errors.StaleVersion(int(d["requested"]), int(d["serving"]), d.get("reason", ""))
    if cls in ("NotFound", "FailedPrecondition", "Unauthenticated"):
        return getattr(errors, cls)(message)
    return errors.ShardUnavailable(shard_id, address, f"{cls}: {message}")
