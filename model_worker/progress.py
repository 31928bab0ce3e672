"""Progress bars for every long loop (training, the demo, the cluster's driver).

In a terminal: tqdm's live bar. Anywhere else (a file, a pipe, CI logs): a plain
line at every 10% of the total and at least every `every_s` seconds, so a log
holds about a dozen lines per loop instead of one redraw every half second.

    for step in progress_bar(range(n), total=n, desc="train"):
        ...
    bar = progress_bar(total=n); bar.n = 40; bar.refresh(); bar.close()   # driven from outside
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import IO

from tqdm import tqdm


def _is_terminal(file: IO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):   # closed or not a real stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
                 desc: str | None = None, disable: bool = False, file: IO | None = None,
                 every: float = 0.1, every_s: float = 60.0, **tqdm_kw):
    """tqdm in a terminal, `LineProgress` otherwise (the same calls work on both:
    iteration, `n`, `update`, `set_postfix`, `refresh`, `close`); tqdm_kw: for tqdm only
    (`unit`, `leave`)."""
    file = file if file is not None else sys.stderr
    if _is_terminal(file):
        return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, file=file, **tqdm_kw)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, disable=disable, file=file,
                        every=every, every_s=every_s)


class LineProgress:
    """tqdm's interface as this project uses it, writing whole lines: one when the
    count crosses each `every` fraction of the total, one at least every `every_s`
    seconds while it moves, and one at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
                 desc: str | None = None, disable: bool = False, file: IO | None = None,
                 every: float = 0.1, every_s: float = 60.0):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = initial
        self.desc = desc or ""
        self.disable = disable
        self.file = file if file is not None else sys.stderr
        self.every, self.every_s = every, every_s
        self.postfix: dict = {}
        self._t0 = self._last_t = time.monotonic()
        self._last_n = initial
        self._last_bucket = self._bucket(initial)
        self._closed = False

    def _bucket(self, n: int) -> int:
        return int(n / self.total / self.every) if self.total else 0

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, k: int = 1) -> None:
        self.n += k
        self.refresh()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw) -> None:
        self.postfix = {**(ordered_dict or {}), **kw}
        if refresh:
            self.refresh()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.set_postfix({"": s} if s else {}, refresh=refresh)

    def refresh(self) -> None:
        if self.disable or self._closed or self.n == self._last_n:
            return
        now = time.monotonic()
        bucket = self._bucket(self.n)
        if bucket > self._last_bucket or now - self._last_t >= self.every_s:
            self._write(now)
            self._last_bucket = bucket

    def _write(self, now: float) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        post = "".join(f" {k}={v}" if k else f" {v}" for k, v in self.postfix.items())
        head = f"{self.desc}: " if self.desc else ""
        print(f"{head}{self.n}{of}{pct} {now - self._t0:.0f}s{post}", file=self.file, flush=True)
        self._last_n, self._last_t = self.n, now

    def close(self) -> None:
        if not self._closed and not self.disable and self.n != self._last_n:
            self._write(time.monotonic())
        self._closed = True
