"""The step barrier of one shard state and what it applies: the accumulated row and key
gradients (merged per row, then one sparse optimizer step) and balancing. Also the
switch of a state's row optimizer (`Shard.set_optimizer`).

The caller holds the state's lock (`barrier` waits on its condition, which releases it).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from . import errors
from .balancing import balance
from .optimizer import OptimizerConfig, RowOptimizer, StepPlan, plan_step, resolve_kind
from .state import ShardState


class BarrierTimeout(errors.FailedPrecondition):
    """end_step waited longer than timeout_s for the other workers."""


StepRefused = errors.StepRefused
_WAIT_SLICE_S = 0.25   # how often a waiting caller checks that it is still there


@dataclasses.dataclass
class Round:
    """The workers waiting at one step: how many the first of them said to wait for, who
    arrived, and why the step was refused (told to this round's waiters only)."""
    n: int
    arrived: set[int] = dataclasses.field(default_factory=set)
    refused: str | None = None


def barrier(st: ShardState, step: int, worker: int, num_workers: int, request_id: str, timeout_s: float,
            active: Callable[[], bool] = lambda: True) -> int:
    """Record `worker`'s arrival for `step`; the last of the step's members applies the step
    and wakes the others. Returns the new step (step + 1); a step already applied (a retry)
    returns at once. Arguments are validated by the caller (timeout_s finite and bounded).

    Membership: the first worker to arrive at a step fixes how many workers it waits for
    (its num_workers); a caller naming another count is refused. An arrival lasts only while
    its caller waits: a caller that times out or goes away (`active()` turns False) is
    withdrawn, and a step nobody waits for any more forgets its membership, so one bad
    EndStep cannot wedge the barrier for later ones."""
    if step < st.step:
        return st.step
    if step > st.step:
        raise errors.InvalidArgument("step", f"shard {st.shard_id} is at step {st.step}, cannot end step {step}")
    rnd = st.arrivals.get(step)
    if rnd is None:
        rnd = st.arrivals[step] = Round(num_workers)
    if rnd.n != num_workers:
        raise errors.InvalidArgument("num_workers", f"{num_workers} differs from {rnd.n}, the count of the "
                                                    f"{len(rnd.arrived)} worker(s) waiting at step {step}")
    rnd.arrived.add(worker)
    if len(rnd.arrived) == rnd.n:
        del st.arrivals[step]
        try:
            apply_step(st)
        except StepRefused as exc:
            rnd.refused = str(exc)   # the waiters of this round are told, not those of a later one
            st.cond.notify_all()
            raise
        st.mark_seen(request_id)
        st.step += 1
        st.cond.notify_all()
        return step + 1
    deadline = time.monotonic() + timeout_s
    while st.step <= step and rnd.refused is None and active():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        st.cond.wait(min(left, _WAIT_SLICE_S))
    if st.step > step:
        st.mark_seen(request_id)
        return step + 1
    if rnd.refused is not None:
        raise StepRefused(rnd.refused)
    rnd.arrived.discard(worker)  # as if it never came: a retry arrives afresh
    if not rnd.arrived and st.arrivals.get(step) is rnd:
        del st.arrivals[step]
    raise BarrierTimeout(f"end_step {step}: {len(rnd.arrived) + 1} of {rnd.n} workers arrived "
                         f"within {timeout_s:g}s (shard {st.shard_id})" if active() else
                         f"end_step {step}: the caller went away (shard {st.shard_id})")


def apply_step(st: ShardState) -> None:
    """One optimizer step on the rows and flat keys that received gradients (frozen rows
    untouched), then balancing; clears the accumulators. The updates are computed first and
    written only if every new value, key and optimizer moment is finite; otherwise the
    step's gradients are dropped, nothing changes, and StepRefused is raised."""
    cfg, opt = st.config, st.config.optimizer
    keys_change = bool(st.key_grads)
    try:
        # No frozen row (known on the host): the optimizer need not pick the others out (on
        # CUDA a boolean mask makes the host wait for the device).
        frozen = st.frozen if st.has_frozen_rows() else None
        plans, row_ids, flat_ids = [], None, None
        if st.row_grads:
            rows, grads = merge_grads(st.row_grads, cfg.d_v, sorted_unique=st.row_grads_sorted)
            row_ids = rows
            plans.append(plan_step(opt.kind, st.values, st.opt, rows, grads, lr=opt.lr, betas=opt.betas,
                                   eps=opt.eps, frozen=frozen, what="values"))
        if st.key_grads:
            pos, grads = merge_grads(st.key_grads, cfg.d_k)
            flat_ids = pos
            plans.append(plan_step(opt.kind, st.keys, st.key_opt, pos, grads, lr=opt.effective_key_lr,
                                   betas=opt.betas, eps=opt.eps,
                                   frozen=None if frozen is None else frozen[st.flat_local], what="keys"))
        plans = [p for p in plans if p is not None]
        bad = [p.what for p, ok in zip(plans, finite_plans(plans)) if not ok]
    finally:
        st.row_grads, st.key_grads, st.pending_grad_bytes = [], [], 0
        st.row_grads_sorted = True
    if bad:
        st.step_hits.zero_()
        st.nonfinite_refused += 1
        raise StepRefused(f"end_step {st.step} on shard {st.shard_id} would make {' and '.join(bad)} "
                          "non-finite; the step's gradients were dropped and nothing changed")
    for p in plans:
        p.commit()
    if row_ids is not None:
        st.mark_rows(row_ids)       # dirty rows: the next delta version writes them
    if flat_ids is not None:
        st.mark_flat(flat_ids)
    if keys_change and st.faiss is not None:
        st.faiss.invalidate()
    # balance() moves flat-row and store-side sub-key biases: where the shard holds neither,
    # there is nothing to move and no need to read whether any row was hit (a host sync)
    if cfg.bias_step > 0 and (st.flat_ids.numel() or st.pieces) and bool(st.step_hits.any()):
        balance(st)
    st.step_hits.zero_()


def finite_plans(plans: list[StepPlan]) -> list[bool]:
    """Whether each plan's new rows and state are all finite, read with one host sync."""
    if not plans:
        return []
    return torch.stack([p.finite_verdict() for p in plans]).tolist()


def check_finite_rows(st: ShardState, block_elems: int = 1 << 26) -> None:
    """Refuse to publish a state holding a non-finite value or key (nothing written).

    Checked block by block (about 64M elements at a time): a whole 16M x 1024 shard cast to
    fp32 at once would take 64 GiB, which is what made a 16M-row GPU snapshot run out of memory.
    """
    for name, t in (("values", st.values), ("keys", st.keys)):
        if not t.numel():
            continue
        rows = t.reshape(t.shape[0], -1)
        step = max(1, block_elems // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            bad = ~torch.isfinite(rows[start:start + step]).all(dim=1)
            if bool(bad.any()):
                row = start + int(torch.nonzero(bad)[0])
                gid = st.row_start + row if name == "values" else int(st.flat_ids[row])
                raise errors.FailedPrecondition(f"shard {st.shard_id}: row {gid} has non-finite {name}; "
                                                "not published")


def merge_grads(pairs: list[tuple[torch.Tensor, torch.Tensor]], dim: int,
                sorted_unique: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, grads) pairs -> (unique sorted ids, summed grads). sorted_unique: every pair's ids
    are known sorted and unique (else one pair is checked: a host sync)."""
    if len(pairs) == 1 and pairs[0][0].numel() <= 1:
        return pairs[0][0], pairs[0][1].float().reshape(-1, dim)
    if len(pairs) == 1 and (sorted_unique or bool((pairs[0][0][1:] > pairs[0][0][:-1]).all())):
        return pairs[0][0], pairs[0][1].float().reshape(-1, dim)  # already unique and sorted
    ids = torch.cat([p[0] for p in pairs])
    grads = torch.cat([p[1].float() for p in pairs]).reshape(-1, dim)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    out = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=grads.device)
    if out.is_cuda:
        # CUDA's index_add_ adds with atomics in no fixed order: the float32 sum of a row sent
        # three or more times then differs from run to run, and between two shards given the
        # same gradients (torch lists it as nondeterministic). index_put_'s accumulate sorts
        # the indices first and is deterministic (torch's own deterministic index_add_ uses it).
        out.index_put_((inverse,), grads, accumulate=True)
    else:
        out.index_add_(0, inverse, grads)   # in arrival order on the CPU
    return uniq, out


def replace_optimizer(st: ShardState, optimizer: OptimizerConfig, bias_step: float | None) -> RowOptimizer:
    """Use `optimizer` (and `bias_step`, when given) from the next step on; returns the
    settings replaced. "auto" resolves for the table's size as this shard knows it. State
    the new kind needs and the shard lacks is allocated (zeros); state of other kinds is
    kept, for a switch back."""
    old = RowOptimizer(st.config.optimizer, st.config.bias_step)
    table_rows = st.segments[-1].row_end
    optimizer = resolve_kind(dataclasses.replace(optimizer), table_rows, st.config.d_v, st.config.value_dtype)
    st.opt.ensure(optimizer.kind, st.values.shape[1])
    st.key_opt.ensure(optimizer.kind, st.keys.shape[1])
    st.config = dataclasses.replace(st.config, optimizer=optimizer,
                                    bias_step=old.bias_step if bias_step is None else float(bias_step))
    return old
