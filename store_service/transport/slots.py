"""The client's pieces of one staging buffer, and a call cut into pieces kept in flight.

A buffer of B bytes is cut into n slots of B/n (aligned); a call whose tensor is larger than
one slot goes as several pieces, up to n of them in flight at once, so the shard's gather of
one piece overlaps the client's copy of another. Several threads may share the slots: a
thread that holds slots never blocks waiting for more (it finishes one of its own first), so
threads cannot deadlock on them."""
from __future__ import annotations

import collections
import itertools
import queue
from dataclasses import dataclass
from typing import Any, Callable

from store_service.transport.sessions import ALIGN


@dataclass(frozen=True)
class Slot:
    offset: int
    capacity: int
    tag: int = 0


class Slots:
    def __init__(self, nbytes: int, n: int, *, tagged: bool = False):
        """nbytes: the buffer (for dist, the most bytes one call may move); tagged: every
        use gets a fresh message tag (dist), offsets then mean nothing."""
        n = max(1, n)
        self.capacity = nbytes if tagged else (nbytes // n) // ALIGN * ALIGN
        self._tags = itertools.count(1) if tagged else None
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._free.put(0 if tagged else i * self.capacity)

    def take(self, block: bool) -> Slot | None:
        try:
            offset = self._free.get(block=block)
        except queue.Empty:
            return None
        return Slot(offset, self.capacity, next(self._tags) if self._tags else 0)

    def give(self, slot: Slot) -> None:
        self._free.put(slot.offset)


def pieces(rows: int, row_bytes: int, capacity: int) -> list[slice]:
    """Row ranges of at most `capacity` bytes each (one empty range for 0 rows). A single row
    wider than a slot cannot travel this way: ValueError."""
    if row_bytes > capacity:
        raise ValueError(f"a row of {row_bytes} bytes does not fit a {capacity}-byte slot")
    step = max(1, capacity // max(row_bytes, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, max(rows, 1), step)] if rows else [slice(0, 0)]


def run(slots: Slots, parts: list, start: Callable[[Any, Slot], Any], finish: Callable[[Any, Slot, Any], None],
        depth: int = 0):
    """For each part: start(part, slot) -> a future (the call in flight), then once it is done
    finish(part, slot, future): up to the slots' count (or `depth`, when > 0) in flight, in
    order. When one fails, the
    calls still in flight are waited for (the shard may still be writing into their slots)
    before every slot is given back; the first error is raised."""
    inflight: collections.deque = collections.deque()

    def complete() -> None:
        part, slot, fut = inflight.popleft()
        try:
            finish(part, slot, fut)
        finally:
            slots.give(slot)

    try:
        for part in parts:
            while depth and len(inflight) >= depth:
                complete()
            slot = slots.take(block=not inflight)
            while slot is None:
                complete()
                slot = slots.take(block=not inflight)
            try:
                inflight.append((part, slot, start(part, slot)))
            except BaseException:
                slots.give(slot)
                raise
        while inflight:
            complete()
    finally:
        while inflight:   # only after an error: drain, keep the first error
            try:
                complete()
            except Exception:
                pass
