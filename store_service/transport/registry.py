"""The sessions one shard server hands out: opening one (after the caller's credentials were
checked), finding it for a call, closing it; with the tickets and the handoff socket.

One table per served shard, shared by whoever opens sessions for it (the `StoreTransport`
service's Open, or a `DataPathServer.open` inside the store's OpenDataPath handshake) and the
service that moves the tensors: `SessionTable.of(shard)`."""
from __future__ import annotations

import secrets
import threading
import time
import weakref

import torch

from store_service import errors
from store_service.transport import cuda_ipc, dist, hostid
from store_service.transport.config import ServerLimits
from store_service.transport.handoff import HandoffServer
from store_service.transport.sessions import CudaSession, DistSession, ShmSession
from store_service.transport.tickets import TicketBook

KINDS = ("shm", "cuda_ipc", "torch_dist")

_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


class SessionTable:
    def __init__(self, shard, host: str = "127.0.0.1", limits: ServerLimits = ServerLimits()):
        self._shard = shard
        self.host = host
        self.limits = limits
        self._tickets = TicketBook(limits.ticket_ttl_s)
        self._sessions: dict = {}
        self._lock = threading.Lock()
        self._handoff: HandoffServer | None = None

    @classmethod
    def of(cls, shard, host: str | None = None, limits: ServerLimits | None = None) -> "SessionTable":
        """The table of `shard` (made on first use; host and limits apply when it is made,
        or replace the host when given: the gRPC server knows the address it binds)."""
        with _TABLES_LOCK:
            table = _TABLES.get(shard)
            if table is None:
                table = _TABLES[shard] = cls(shard, host or "127.0.0.1", limits or ServerLimits())
            elif host:
                table.host = host
            return table

    @property
    def device(self) -> torch.device:
        return getattr(self._shard, "device", torch.device("cpu"))

    def open(self, kind: str, client_host: str, buffer_bytes: int = 0, backend: str = "gloo") -> dict:
        """A new session of `kind` for a caller whose credentials were checked -> what it needs to
        connect: session, ticket, socket (shm, cuda_ipc), buffer_bytes, rendezvous_host/port
        (torch_dist), max_bytes, host_id. FailedPrecondition where the kind cannot serve it."""
        if kind not in KINDS:
            raise errors.InvalidArgument("kind", f"{kind!r}; use one of {KINDS}")
        if kind in ("shm", "cuda_ipc") and client_host != hostid.host_id():
            raise errors.FailedPrecondition(f"transport {kind!r} is for callers on this shard's host")
        if kind == "cuda_ipc" and (not cuda_ipc.available() or self.device.type != "cuda"):
            raise errors.FailedPrecondition("transport 'cuda_ipc': this shard's rows are not on a GPU")
        if kind == "torch_dist" and not dist.available(backend or "gloo"):
            raise errors.FailedPrecondition(f"transport 'torch_dist': backend {backend!r} is not available here")
        if kind != "torch_dist" and not 0 < buffer_bytes <= self.limits.max_buffer_bytes:
            raise errors.InvalidArgument("buffer_bytes", f"must be in (0, {self.limits.max_buffer_bytes}], "
                                                         f"got {buffer_bytes}")
        self._make_room()
        sid = secrets.token_hex(16)   # a capability: unguessable, known only to the caller
        out = {"session": sid, "max_bytes": self.limits.max_call_bytes, "host_id": hostid.host_id()}
        if kind == "torch_dist":
            prefix = secrets.token_urlsafe(32)   # the group's key prefix, known to the caller only
            session = DistSession(sid, backend or "gloo", self.host, prefix, self.limits.max_call_bytes,
                                  self.limits.group_timeout_s)
            out.update(ticket=prefix, rendezvous_host=self.host, rendezvous_port=session.port, backend=backend or "gloo")
        else:
            session = (ShmSession(sid, buffer_bytes, self.device) if kind == "shm"
                       else CudaSession(sid, buffer_bytes, self.device))
            out.update(ticket=self._tickets.issue(sid), socket=self._handoff_name(), buffer_bytes=buffer_bytes)
        with self._lock:
            self._sessions[sid] = session
        return out

    def _make_room(self) -> None:
        """Drop sessions idle past the limit; refuse when still full."""
        now = time.monotonic()
        with self._lock:
            for s in [s for s in self._sessions.values() if now - s.last_used > self.limits.idle_s]:
                self._sessions.pop(s.id).close()
            if len(self._sessions) >= self.limits.max_sessions:
                raise errors.FailedPrecondition(f"{len(self._sessions)} transport sessions open "
                                                f"(limit {self.limits.max_sessions}); close one")

    def _handoff_name(self) -> str:
        with self._lock:
            if self._handoff is None:
                self._handoff = HandoffServer(self._tickets, self._grant, on_gone=self.close)
            return self._handoff.name

    def _grant(self, sid: str):
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise errors.NotFound("the ticket's session is closed")
        return session.grant()

    def get(self, sid: str):
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise errors.NotFound(f"no transport session {sid[:16]!r} on this shard (closed, expired or "
                                  f"the shard restarted)")
        session.touch()
        return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self, sid: str) -> None:
        """Drop a session (its client closed it, or the handoff lease of a same-host one ended)."""
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is not None:
            session.close()
            self._drop_leases(sid)

    def _drop_leases(self, sid: str) -> None:
        """The version leases the session's reads held (store_service/leases.py) go with it."""
        drop = getattr(self._shard, "drop_leases", None)
        if drop is not None:
            drop(f"session:{sid}")

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            handoff, self._handoff = self._handoff, None
        for s in sessions:
            s.close()
            self._drop_leases(s.id)
        if handoff is not None:
            handoff.close()
