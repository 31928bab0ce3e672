"""The shard's `StoreTransport` service: sessions of the bulk data path and the calls that
move a tensor through one (protos/knowledge_store.proto says the contract).

Every call goes through the server's `_Rpc.handle` like any other: credentials checked,
errors mapped to status codes in the one place, metrics kept. ROLES is where each call's
role is registered (today every role means the bearer token).

    add_transport_service(grpc_server, rpc, host="127.0.0.1")   # in serve_shard
"""
from __future__ import annotations

import secrets
import threading
import time

import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, wire
from store_service.transport import cuda_ipc, dist, hostid
from store_service.transport.config import ServerLimits
from store_service.transport.handoff import HandoffServer
from store_service.transport.sessions import CudaSession, DistSession, ShmSession
from store_service.transport.tickets import TicketBook

SERVICE = "knowledge_store.v1.StoreTransport"

# The role each call needs. Until per-role credentials exist every role is the bearer token;
# a handle to a buffer is never handed out without it.
ROLES = {"Open": "read", "Close": "read", "Fetch": "read", "Readout": "read", "PushGrads": "train"}

_GRAD_DTYPES = {"value": ("float32", "bfloat16"), "key": ("float32",)}


class StoreTransportServicer(pb_grpc.StoreTransportServicer):
    def __init__(self, rpc, host: str, limits: ServerLimits = ServerLimits()):
        self._rpc = rpc
        self._shard = rpc.shard
        self._host = host
        self._limits = limits
        self._tickets = TicketBook(limits.ticket_ttl_s)
        self._sessions: dict = {}
        self._lock = threading.Lock()
        self._handoff: HandoffServer | None = None
        self._dims: dict | None = None

    @property
    def _d(self) -> dict:
        """Row widths and the value dtype: fixed for a table's life (a swap keeps the layout)."""
        if self._dims is None:
            d = self._shard.describe()
            self._dims = {"value": d.d_v, "key": d.d_k, "dtype": wire.DTYPES[d.value_dtype]}
        return self._dims

    @property
    def _device(self) -> torch.device:
        return getattr(self._shard, "device", torch.device("cpu"))

    def _call(self, method: str, context, call, items: int = 0):
        # Roles: once they land, `role=ROLES[method]` replaces `admin=True` here, nothing else.
        return self._rpc.handle(f"Transport.{method}", context, call, admin=True, items=items)

    # -- sessions ------------------------------------------------------------------

    def Open(self, request, context):
        return self._call("Open", context, lambda: self._open(request))

    def _open(self, request) -> pb.OpenTransportResponse:
        kind = request.kind
        if kind in ("shm", "cuda_ipc") and request.host_id != hostid.host_id():
            raise errors.FailedPrecondition(f"transport {kind!r} is for callers on this shard's host")
        if kind == "cuda_ipc" and (not cuda_ipc.available() or self._device.type != "cuda"):
            raise errors.FailedPrecondition("transport 'cuda_ipc': this shard's rows are not on a GPU")
        if kind in ("shm", "cuda_ipc") and not 0 < request.buffer_bytes <= self._limits.max_buffer_bytes:
            raise errors.InvalidArgument("buffer_bytes", f"must be in (0, {self._limits.max_buffer_bytes}], "
                                                         f"got {request.buffer_bytes}")
        backend = request.backend or "gloo"
        if kind == "dist" and not dist.available(backend):
            raise errors.FailedPrecondition(f"transport 'dist': backend {backend!r} is not available here")
        if kind not in ("shm", "cuda_ipc", "dist"):
            raise errors.InvalidArgument("kind", f"{kind!r}; use 'shm', 'cuda_ipc' or 'dist'")
        sid = secrets.token_hex(16)
        resp = pb.OpenTransportResponse(session=sid, host_id=hostid.host_id(), max_bytes=self._limits.max_call_bytes)
        self._make_room()
        if kind == "dist":
            ticket = secrets.token_urlsafe(32)   # the group's key prefix: known to the caller only
            session = DistSession(sid, backend, self._host, ticket, self._limits.max_call_bytes,
                                  self._limits.group_timeout_s)
            resp.ticket, resp.rendezvous_host, resp.rendezvous_port = ticket, self._host, session.port
        else:
            session = (ShmSession(sid, request.buffer_bytes) if kind == "shm"
                       else CudaSession(sid, request.buffer_bytes, self._device))
            resp.ticket, resp.socket, resp.buffer_bytes = self._tickets.issue(sid), self._handoff_name(), \
                request.buffer_bytes
        with self._lock:
            self._sessions[sid] = session
        return resp

    def _make_room(self) -> None:
        """Drop sessions idle past the limit; refuse when still full."""
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._sessions.values() if now - s.last_used > self._limits.idle_s]
            for s in idle:
                self._sessions.pop(s.id).close()
            if len(self._sessions) >= self._limits.max_sessions:
                raise errors.FailedPrecondition(f"{len(self._sessions)} transport sessions open "
                                                f"(limit {self._limits.max_sessions}); close one")

    def _handoff_name(self) -> str:
        with self._lock:
            if self._handoff is None:
                self._handoff = HandoffServer(self._tickets, self._grant)
            return self._handoff.name

    def _grant(self, sid: str):
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise errors.NotFound("the ticket's session is closed")
        return session.grant()

    def _session(self, sid: str):
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise errors.NotFound(f"no transport session {sid[:16]!r} on this shard (closed, expired or "
                                  f"the shard restarted)")
        session.touch()
        return session

    def Close(self, request, context):
        def call():
            with self._lock:
                session = self._sessions.pop(request.session, None)
            if session is not None:
                session.close()
            return pb.CloseTransportResponse()
        return self._call("Close", context, call)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            handoff, self._handoff = self._handoff, None
        for s in sessions:
            s.close()
        if handoff is not None:
            handoff.close()

    # -- moving tensors ----------------------------------------------------------------

    def Fetch(self, request, context):
        def call():
            session = self._session(request.at.session)
            ids, out_dtype, usage = wire.fetch_request_from_proto(request.fetch)
            dtype = out_dtype or self._d["dtype"]
            out = session.out_tensor(request.at, dtype, (ids.shape[0], self._d["value"]), self._device)
            version, step = _fetch_into(self._shard, ids, out, usage, request.fetch.version)
            session.sent(request.at, out)
            resp = pb.PlacedFetchResponse(version=version, step=step)
            resp.values.dtype, resp.values.shape[:] = wire.dtype_name(dtype), out.shape
            return resp
        return self._call("Fetch", context, call, items=len(request.fetch.ids.shape) and request.fetch.ids.shape[0])

    def Readout(self, request, context):
        def call():
            session = self._session(request.at.session)
            _, ids, weights = wire.readout_entries_from_proto(request.readout, self._device)
            dtype = wire.readout_wire_dtype(request.readout.out_dtype, "out_dtype")
            version = request.readout.version or _serving(self._shard)
            out = session.out_tensor(request.at, dtype, (ids.shape[0], self._d["value"]), self._device)
            out.copy_(self._shard.readout(ids, weights, version=version))
            session.sent(request.at, out)
            resp = pb.PlacedReadoutResponse(version=version)
            resp.out.dtype, resp.out.shape[:] = wire.dtype_name(dtype), out.shape
            return resp
        return self._call("Readout", context, call, items=wire.readout_tokens(request.readout))

    def PushGrads(self, request, context):
        def call():
            session = self._session(request.at.session)
            kind = request.kind
            if kind not in _GRAD_DTYPES:
                raise errors.InvalidArgument("kind", f"{kind!r}; use 'value' or 'key'")
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            g = request.grads
            if g.dtype not in _GRAD_DTYPES[kind] or list(g.shape) != [ids.shape[0], self._d[kind]]:
                raise errors.InvalidArgument("grads", f"expected {' or '.join(_GRAD_DTYPES[kind])} "
                                                      f"[{ids.shape[0]}, {self._d[kind]}], got {g.dtype} {list(g.shape)}")
            grads = session.in_tensor(request.at, wire.DTYPES[g.dtype], tuple(g.shape), self._device).float()
            push = (self._shard.accumulate_value_grads if kind == "value" else self._shard.accumulate_key_grads)
            push(ids, grads, request_id=request.request_id, version=request.version)
            return pb.PlacedGradsResponse()
        return self._call("PushGrads", context, call, items=len(request.ids.shape) and request.ids.shape[0])


def _serving(shard) -> int:
    v = getattr(shard, "serving_version", None)
    return int(v) if v is not None else shard.describe().info.version


def _fetch_into(shard, ids, out, usage, version) -> tuple[int, int]:
    """Rows into `out` under one lock where the shard can (`Shard.fetch_into`), else a fetch
    of the version pinned first, then a copy."""
    if hasattr(shard, "fetch_into"):
        return shard.fetch_into(ids, out, **usage, version=version)
    version = version or _serving(shard)
    out.copy_(shard.fetch(ids, **usage, version=version))
    return version, -1


def add_transport_service(server, rpc, host: str, limits: ServerLimits = ServerLimits()) -> StoreTransportServicer:
    servicer = StoreTransportServicer(rpc, host, limits)
    pb_grpc.add_StoreTransportServicer_to_server(servicer, server)
    return servicer
