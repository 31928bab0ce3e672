"""Checks of what a caller sends, shared by `Shard` and `Table`.

Each raises `errors.InvalidArgument` naming the offending field, before anything
changes. Checks that need a shard's rows (ids in its range, k against its view of
the table) take the bounds as arguments.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence, TypeVar

import torch

from . import errors
from .interface import PAD_ID, SEGMENT_FLAT, TAG_UNSET, SegmentInfo, SideQuery, TagFilter
from .limits import Limits, at_most
from .optimizer import OptimizerConfig

TAG_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_TAG_NAMES = 16            # per table
MAX_FILTER_VALUES = 1 << 16   # values of one TagFilter
T = TypeVar("T")


# -- device-side checks read at once ---------------------------------------------------------
# A check of a tensor's entries (finite, bounded, ids in range) is a reduction on the tensor's
# device whose verdict the host must read: on a GPU every such read waits for all the work
# queued before it. The checks that take `defer` put their verdict there instead (and pass for
# now); `at_once` reads all of them with one wait.

def _holds(ok: torch.Tensor, defer: list[torch.Tensor] | None) -> bool:
    """A device-side verdict (0-dim bool): read now, or with `defer` kept to be read later."""
    if defer is None:
        return bool(ok)
    defer.append(ok)
    return True


def _all_hold(verdicts: list[torch.Tensor]) -> bool:
    """Every verdict true: one host read per device they lie on."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for v in verdicts:
        by_device.setdefault(v.device, []).append(v)
    return all(bool(torch.stack(vs).all()) for vs in by_device.values())


def at_once(checks: Callable[[list[torch.Tensor] | None], T]) -> T:
    """checks(defer): run checks whose device-side verdicts go to `defer`, then read them with
    one host sync. If one failed, or a host-side check raised after a deferred one that failed,
    the checks run again one by one (checks(None)), so the error raised is the one the checks
    in order raise. Returns what `checks` returns."""
    verdicts: list[torch.Tensor] = []
    try:
        out = checks(verdicts)
    except errors.StoreError:
        if _all_hold(verdicts):
            raise
        return checks(None)
    return out if _all_hold(verdicts) else checks(None)


def host_side(checks: Callable[[list[torch.Tensor] | None], T]) -> T:
    """checks(defer) with the device-side verdicts left unread: for a caller whose callee reads
    the same verdicts itself before it changes anything. A host-side error raised is the one
    the checks in order raise (a device fault before it comes first, as with `at_once`)."""
    try:
        return checks([])
    except errors.StoreError:
        at_once(checks)
        raise


def tensor(field: str, t, dtype: torch.dtype | tuple[torch.dtype, ...], shape: tuple,
           defer: list[torch.Tensor] | None = None) -> torch.Tensor:
    """t must be a non-empty tensor of `dtype` and `shape` (ints must match, None matches
    anything), and finite when floating (that verdict kept in `defer` when given: `at_once`)."""
    if not isinstance(t, torch.Tensor):
        raise errors.InvalidArgument(field, f"expected a tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise errors.InvalidArgument(field, f"dtype must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise errors.InvalidArgument(field, f"shape must be {want}, got {list(t.shape)}")
    if t.numel() == 0:
        raise errors.InvalidArgument(field, f"empty batch (shape {list(t.shape)})")
    if t.is_floating_point() and not _holds(torch.isfinite(t).all(), defer):
        raise errors.InvalidArgument(field, "contains NaN or Inf")
    return t


def ids_in_range(field: str, ids: torch.Tensor, lo: int, hi: int, *, allow_pad: bool,
                 defer: list[torch.Tensor] | None = None) -> None:
    bad = (ids < lo) | (ids >= hi)
    if allow_pad:
        bad &= ids != PAD_ID
    if not _holds(~bad.any(), defer):
        first = int(ids[bad].reshape(-1)[0])
        raise errors.InvalidArgument(field, f"id {first} is not in this shard's rows [{lo}, {hi})"
                                     + (" (and is not padding -1)" if allow_pad else ""))


def ids_in_table(field: str, ids: torch.Tensor, num_rows: int, *, allow_pad: bool,
                 defer: list[torch.Tensor] | None = None) -> None:
    bad = (ids >= num_rows) | (ids < (PAD_ID if allow_pad else 0))
    if not _holds(~bad.any(), defer):
        raise errors.InvalidArgument(field, f"id {int(ids[bad].reshape(-1)[0])} is out of range "
                                            f"[{'-1 (padding), ' if allow_pad else ''}0, {num_rows})")


def flat_rows(field: str, ids: torch.Tensor, segments: Sequence[SegmentInfo]) -> None:
    """ids (or PAD) must be rows of flat segments (key gradients are for flat keys)."""
    ids = ids.cpu()
    flat = torch.zeros(ids.shape, dtype=torch.bool)
    for seg in segments:
        if seg.kind == SEGMENT_FLAT:
            flat |= (ids >= seg.row_start) & (ids < seg.row_end)
    bad = (ids >= 0) & ~flat
    if bool(bad.any()):
        raise errors.InvalidArgument(field, f"id {int(ids[bad][0])} is a product-key row; "
                                            "key gradients are for flat rows")


def integer(field: str, x, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise errors.InvalidArgument(field, f"expected an int, got {type(x).__name__}")
    if x < lo or (hi is not None and x >= hi):
        raise errors.InvalidArgument(field, f"{x} is out of range [{lo}, {'inf' if hi is None else hi})")
    return x


def flag(field: str, x) -> bool:
    if not isinstance(x, bool):
        raise errors.InvalidArgument(field, f"expected a bool, got {type(x).__name__}")
    return x


def fetch_usage(ids: torch.Tensor, hits: torch.Tensor | None, weight_sum: torch.Tensor | None,
                limits: Limits = Limits()) -> None:
    """A fetch's usage: hits [M] int64 in [0, max_usage_hits] and weight_sum [M] float64 with
    |w| <= max_usage_weight_abs, both or neither (so counters can neither wrap nor run away)."""
    if (hits is None) != (weight_sum is None):
        raise errors.InvalidArgument("hits" if hits is None else "weight_sum",
                                     "hits and weight_sum come together (a fetch's usage) or not at all")
    if hits is None:
        return
    tensor("hits", hits, torch.int64, (ids.shape[0],))
    tensor("weight_sum", weight_sum, torch.float64, (ids.shape[0],))
    if bool((hits < 0).any()):
        raise errors.InvalidArgument("hits", "counts must be >= 0")
    if bool((hits > limits.max_usage_hits).any()):
        raise errors.InvalidArgument("hits", f"counts must be <= max_usage_hits={limits.max_usage_hits}")
    magnitude("weight_sum", weight_sum, limits.max_usage_weight_abs, "max_usage_weight_abs")


def magnitude(field: str, t: torch.Tensor, bound: float, limit: str,
              defer: list[torch.Tensor] | None = None) -> None:
    """|t| <= bound everywhere (t already checked finite): the documented bounds that keep
    sums of gradients and usage finite (store_service/limits.py)."""
    # compared in float64, as python compares float(max) with the bound
    if t.numel() and not _holds(~(t.abs().max().double() > bound), defer):
        raise errors.NonFinite(field, f"|entries| must be <= {limit}={bound:g}, got {float(t.abs().max()):.3g}")


def barrier_timeout(timeout_s, limits: Limits) -> float:
    """EndStep.timeout_s: a finite number in (0, max_barrier_timeout_s]."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or not 0 < timeout_s <= limits.max_barrier_timeout_s:
        raise errors.InvalidArgument("timeout_s", f"must be finite, > 0 and <= max_barrier_timeout_s="
                                                  f"{limits.max_barrier_timeout_s:g}, got {timeout_s!r}")
    return float(timeout_s)


def pending_grads(held_bytes: int, add: torch.Tensor, limits: Limits) -> int:
    """Bytes of gradients held until the next end step, with `add` (float32) added."""
    total = held_bytes + add.numel() * 4
    at_most("max_pending_grad_bytes", total, limits.max_pending_grad_bytes, "gradient bytes pending this step")
    return total


def readout_entries(ids: torch.Tensor, weights: torch.Tensor, defer: list[torch.Tensor] | None = None) -> None:
    """ids [T, k] int64, weights [T, k] float32."""
    tensor("ids", ids, torch.int64, (None, None))
    tensor("weights", weights, torch.float32, tuple(ids.shape), defer)


# -- tags, partitions, search options ------------------------------------------------

def tag_name(field: str, name) -> str:
    if not isinstance(name, str) or not TAG_NAME.match(name):
        raise errors.InvalidArgument(field, f"tag names match {TAG_NAME.pattern}, got {name!r}")
    return name


def tag_names(names) -> tuple[str, ...]:
    """The `tags` a search asks for: distinct valid names, at most MAX_TAG_NAMES."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise errors.InvalidArgument("tags", f"expected a sequence of tag names, got {type(names).__name__}")
    out = tuple(tag_name("tags", n) for n in names)
    if len(set(out)) != len(out):
        raise errors.InvalidArgument("tags", f"names repeat: {list(out)}")
    if len(out) > MAX_TAG_NAMES:
        raise errors.InvalidArgument("tags", f"at most {MAX_TAG_NAMES} names, got {len(out)}")
    return out


def row_tags(tags: Mapping[str, torch.Tensor] | None, num_rows: int) -> dict[str, torch.Tensor]:
    """add_rows' tags: name -> [M] int64 >= -1 (-1: unset)."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise errors.InvalidArgument("tags", f"expected a mapping name -> tensor, got {type(tags).__name__}")
    out = {}
    for name, t in tags.items():
        tag_name("tags", name)
        field = f"tags[{name}]"
        tensor(field, t, torch.int64, (num_rows,))
        if bool((t < TAG_UNSET).any()):
            raise errors.InvalidArgument(field, f"tags are >= 0 (or -1 for unset); got {int(t.min())}")
        out[name] = t
    return out


def tag_count(held: Sequence[str], new: Sequence[str]) -> None:
    """A table holds at most MAX_TAG_NAMES tag names."""
    names = set(held) | set(new)
    if len(names) > MAX_TAG_NAMES:
        raise errors.InvalidArgument("tags", f"a table holds at most {MAX_TAG_NAMES} tag names; these rows "
                                             f"would make {len(names)}: {sorted(names)}")


def row_partition(partition, num_rows: int) -> torch.Tensor | int:
    """add_rows' partition: one int >= 0 for every row, or [M] int64 >= 0."""
    if isinstance(partition, torch.Tensor):
        tensor("partition", partition, torch.int64, (num_rows,))
        if bool((partition < 0).any()):
            raise errors.InvalidArgument("partition", f"partitions are >= 0, got {int(partition.min())}")
        return partition
    return integer("partition", partition, 0)


def tag_filter(where) -> TagFilter | None:
    if where is None:
        return None
    if not isinstance(where, TagFilter):
        raise errors.InvalidArgument("where", f"expected a TagFilter, got {type(where).__name__}")
    tag_name("where.name", where.name)
    if not isinstance(where.values, tuple):
        raise errors.InvalidArgument("where.values", f"expected a tuple of ints, got {type(where.values).__name__}")
    if len(where.values) > MAX_FILTER_VALUES:
        raise errors.InvalidArgument("where.values", f"at most {MAX_FILTER_VALUES} values, got {len(where.values)}")
    for v in where.values:
        integer("where.values", v, 0)
    return where


def side_query(side) -> SideQuery | None:
    if side is None:
        return None
    if not isinstance(side, SideQuery):
        raise errors.InvalidArgument("side", f"expected a SideQuery, got {type(side).__name__}")
    integer("side.partition", side.partition, 1)
    integer("side.k", side.k, 1)
    return side


def row_optimizer(optimizer, bias_step) -> None:
    """set_optimizer's arguments (OptimizerConfig validates its own fields)."""
    if not isinstance(optimizer, OptimizerConfig):
        raise errors.InvalidArgument("optimizer", f"expected an OptimizerConfig, got {type(optimizer).__name__}")
    if bias_step is not None:
        if isinstance(bias_step, bool) or not isinstance(bias_step, (int, float)) \
                or not (bias_step >= 0 and math.isfinite(bias_step)):
            raise errors.InvalidArgument("bias_step", f"must be a finite number >= 0, got {bias_step!r}")
