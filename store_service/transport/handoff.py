"""Handing a buffer to a process on the same host: a unix socket that gives out file
descriptors (and a small JSON header) against one-time tickets, never anything else.

The socket lives in the abstract namespace (a random name, no file to clean up, gone with
the process). A client connects, sends one ticket line; the server redeems it through its
`TicketBook` and answers with the header and the descriptors (SCM_RIGHTS, socket.send_fds),
or with an error header and none. Reaching the socket proves only that the caller is on this
host: the ticket, handed out by an authenticated gRPC call, is what authorises it.

    server = HandoffServer(tickets, grant=lambda what: (header, [fd]), on_gone=lambda what: ...)
    header, fds, lease = receive(server.name, ticket)

The connection stays open as a lease for as long as the client holds what it got: when it
closes (the client closed its path, or its process died), the server calls `on_gone`, so a
client that dies without saying so does not leave its buffer behind.
"""
from __future__ import annotations

import json
import logging
import secrets
import socket
import struct
import threading
from typing import Any, Callable

from store_service import errors

log = logging.getLogger(__name__)

_MAX_TICKET = 256
_MAX_HEADER = 1 << 20
_MAX_FDS = 4


class HandoffServer:
    """Accepts on an abstract unix socket until `close()`; `grant(what)` -> (header dict, fds)
    for the thing a redeemed ticket was issued for."""

    def __init__(self, tickets, grant: Callable[[Any], tuple[dict, list[int]]],
                 on_gone: Callable[[Any], None] | None = None, timeout_s: float = 5.0):
        self.name = f"kstore-handoff-{secrets.token_hex(12)}"
        self._tickets = tickets
        self._grant = grant
        self._on_gone = on_gone
        self._timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(16)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kstore-handoff", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return   # closed
            # A thread per connection: a peer that connects and says nothing holds only its own,
            # for at most the timeout.
            threading.Thread(target=self._handle, args=(conn,), name="kstore-handoff-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self._timeout_s)
                what = self._answer(conn)
            except Exception:   # a bad peer must never stop the server
                log.warning("handoff connection failed", exc_info=True)
                return
            if what is None:
                return
            conn.settimeout(None)
            try:   # the lease: held until the client closes it or dies
                while conn.recv(64):
                    pass
            except OSError:
                pass
            if self._on_gone is not None and not self._closed.is_set():
                self._on_gone(what)

    def _answer(self, conn: socket.socket):
        """-> what the redeemed ticket was for, or None when it was refused."""
        ticket = _read_line(conn, _MAX_TICKET)
        try:
            what = self._tickets.redeem(ticket)
            header, fds = self._grant(what)
        except errors.StoreError as exc:
            _send(conn, {"error": type(exc).__name__, "message": str(exc)}, [])
            return None
        _send(conn, header, fds)
        return what

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5.0)


def receive(name: str, ticket: str, timeout_s: float = 5.0) -> tuple[dict, list[int], socket.socket]:
    """Redeem `ticket` at the handoff socket `name` -> (header, fds, lease). The caller owns
    the fds, and holds the lease (an open socket) for as long as it uses them: closing it tells
    the server they are given up. Unauthenticated when the ticket is refused; OSError when the
    socket cannot be reached (another host or network namespace)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout_s)
        s.connect("\0" + name)
        s.sendall(ticket.encode() + b"\n")
        size = struct.unpack("<I", _read_exact(s, 4))[0]
        if size > _MAX_HEADER:
            raise OSError(f"handoff header of {size} bytes")
        data, fds, _, _ = socket.recv_fds(s, size, _MAX_FDS)
        while len(data) < size:   # the descriptors arrive with the first bytes
            more = s.recv(size - len(data))
            if not more:
                raise OSError("handoff socket closed mid-header")
            data += more
        header = json.loads(data)
        if "error" in header:
            for fd in fds:
                _close_fd(fd)
            if header["error"] == "Unauthenticated":
                raise errors.Unauthenticated(header["message"])
            raise errors.FailedPrecondition(header["message"])
    except BaseException:
        s.close()
        raise
    return header, list(fds), s


def _send(conn: socket.socket, header: dict, fds: list[int]) -> None:
    data = json.dumps(header).encode()
    conn.sendall(struct.pack("<I", len(data)))
    socket.send_fds(conn, [data], fds)


def _read_line(conn: socket.socket, limit: int) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        if len(buf) > limit:
            raise ValueError("handoff ticket line too long")
        chunk = conn.recv(limit)
        if not chunk:
            raise ValueError("handoff peer closed before its ticket")
        buf += chunk
    return buf[:-1].decode("ascii", errors="replace")


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("handoff socket closed")
        buf += chunk
    return buf


def _close_fd(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass
