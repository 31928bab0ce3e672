"""One-time tickets: what an authenticated call hands out and a side channel takes back.

A ticket is 32 random bytes (urlsafe text), redeemable once, before it expires, for the
thing it was issued for. The side channels (a unix socket, a TCPStore) never see a
credential, only tickets."""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from store_service import errors


class TicketBook:
    def __init__(self, ttl_s: float = 30.0, max_open: int = 1024):
        self._ttl_s = ttl_s
        self._max_open = max_open
        self._open: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def issue(self, what: Any) -> str:
        ticket = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._open = {t: v for t, v in self._open.items() if v[0] > now}
            if len(self._open) >= self._max_open:
                raise errors.FailedPrecondition(f"{len(self._open)} tickets outstanding; redeem or let them expire")
            self._open[ticket] = (now + self._ttl_s, what)
        return ticket

    def redeem(self, ticket: str) -> Any:
        """What `ticket` was issued for; it can never be redeemed again. Unauthenticated
        for an unknown, used or expired one."""
        with self._lock:
            entry = self._open.pop(ticket, None)
        if entry is None or entry[0] < time.monotonic():
            raise errors.Unauthenticated("the ticket is unknown, used or expired")
        return entry[1]
