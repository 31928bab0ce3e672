"""Bounds on the work one request may ask of a shard server, and on what it may send.

Every bound here is checked before anything changes; a request over a size bound gets
RESOURCE_EXHAUSTED naming the limit (`errors.ResourceExhausted`), a number out of its
range gets INVALID_ARGUMENT naming the field. The defaults are large enough for the
scale and data-plane benchmarks (fetches of 100k rows x 1024 bf16, 16M-row tables);
change them with `serve_shard(..., limits=Limits(...))` or the `--limit NAME=VALUE`
flag of `python -m store_service.serve`.

Why the gradient bounds keep every stored number finite: a step sums at most
max_pending_grad_bytes / 4 (about 1e9) float32 gradient entries per shard, each at most
max_grad_abs (1e8) in magnitude, so a row's summed gradient stays below 1e17 and its
square (Adam's second moment) below 1e34, under float32's 3.4e38. A step whose result
is non-finite anyway (an extreme learning rate) is refused whole (`step.apply_step`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import errors


@dataclass(frozen=True)
class Limits:
    max_k: int = 4096                          # top-k (and side-query k) of one search
    max_queries: int = 65536                   # query rows of one search
    max_fetch_rows: int = 1 << 22              # ids of one fetch or gradient call (the reply bound guards memory)
    max_readout_rows: int = 1 << 18            # token rows of one readout (with or without a slot mask)
    max_mask_slots: int = 1 << 26              # rows x cols of one readout's slot grid
    max_reply_bytes: int = 512 << 20           # what one answer may carry
    max_pending_grad_bytes: int = 4 << 30      # gradients a shard holds between two end steps
    max_grad_abs: float = 1e8                  # |value or key gradient| entries, |grad_out|, and their products
    max_weight_abs: float = 1e6                # |readout weight|
    max_usage_hits: int = 1 << 32              # one fetch's hits per row
    max_usage_weight_abs: float = 1e12         # |one fetch's weight_sum per row|
    max_barrier_timeout_s: float = 3600.0      # EndStep.timeout_s: finite, 0 < t <= this
    max_barrier_waiters: int = 16              # EndStep calls waiting at once (>= data-parallel workers - 1)
    max_path_chars: int = 1024                 # admin paths (relative to the store root)
    max_error_chars: int = 400                 # error texts are cut to this many characters

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Limits.{f.name} must be a finite number > 0, got {v!r}")

    def with_overrides(self, pairs: list[str]) -> "Limits":
        """NAME=VALUE strings (the serve command's --limit flags) -> a copy with those set."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        out = {}
        for pair in pairs:
            name, _, value = pair.partition("=")
            if name not in types:
                raise ValueError(f"unknown limit {name!r}; known: {sorted(types)}")
            out[name] = int(float(value)) if types[name] in ("int", int) else float(value)
        return dataclasses.replace(self, **out)


def exceeds(limit: str, got: int | float, bound: int | float, what: str) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(limit, f"{what} {got} exceeds the limit {limit}={bound}")


def at_most(limit: str, got: int | float, bound: int | float, what: str) -> None:
    if got > bound:
        raise exceeds(limit, got, bound, what)
