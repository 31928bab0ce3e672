"""The step barrier of one shard state and what it applies: the accumulated row and key
gradients (merged per row, then one sparse optimizer step) and balancing. Also the
switch of a state's row optimizer (`Shard.set_optimizer`).

The caller holds the state's lock (`barrier` waits on its condition, which releases it).
"""
from __future__ import annotations

import dataclasses

import torch

from . import errors
from .balancing import balance
from .optimizer import OptimizerConfig, RowOptimizer, resolve_kind, sparse_step
from .state import ShardState


class BarrierTimeout(errors.FailedPrecondition):
    """end_step waited longer than timeout_s for the other workers."""


def barrier(st: ShardState, step: int, worker: int, num_workers: int, request_id: str, timeout_s: float) -> int:
    """Record `worker`'s arrival for `step`; the last of num_workers applies the step and
    wakes the others. Returns the new step (step + 1); a step already applied (a retry)
    returns at once. Arguments are validated by the caller."""
    if step < st.step:
        return st.step
    if step > st.step:
        raise errors.InvalidArgument("step", f"shard {st.shard_id} is at step {st.step}, cannot end step {step}")
    n, arrived = st.arrivals.get(step, (num_workers, set()))
    if n != num_workers:
        raise errors.InvalidArgument("num_workers", f"{num_workers} differs from {n} given by "
                                                    "another worker for this step")
    st.arrivals[step] = (n, arrived)
    arrived.add(worker)
    st.mark_seen(request_id)
    if len(arrived) == n:
        apply_step(st)
        st.step += 1
        del st.arrivals[step]
        st.cond.notify_all()
    elif not st.cond.wait_for(lambda: st.step > step, timeout_s):
        arrived.discard(worker)  # as if it never came: a retry arrives afresh
        if not arrived:
            del st.arrivals[step]
        raise BarrierTimeout(f"end_step {step}: {len(arrived)} of {n} workers arrived "
                             f"within {timeout_s}s (shard {st.shard_id})")
    return step + 1


def apply_step(st: ShardState) -> None:
    """One optimizer step on the rows and flat keys that received gradients (frozen rows
    untouched), then balancing; clears the accumulators."""
    cfg, opt = st.config, st.config.optimizer
    if st.row_grads:
        rows, grads = merge_grads(st.row_grads, cfg.d_v)
        sparse_step(opt.kind, st.values, st.opt, rows, grads, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                    frozen=st.frozen)
        st.mark_rows(rows)
    if st.key_grads:
        pos, grads = merge_grads(st.key_grads, cfg.d_k)
        sparse_step(opt.kind, st.keys, st.key_opt, pos, grads, lr=opt.effective_key_lr, betas=opt.betas,
                    eps=opt.eps, frozen=st.frozen[st.flat_local])
        st.mark_flat(pos)
        if st.faiss is not None:
            st.faiss.invalidate()
    if cfg.bias_step > 0 and bool(st.step_hits.any()):
        balance(st)
    st.row_grads, st.key_grads = [], []
    st.step_hits.zero_()


def merge_grads(pairs: list[tuple[torch.Tensor, torch.Tensor]], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, grads) pairs -> (unique sorted ids, summed grads)."""
    if len(pairs) == 1 and pairs[0][0].numel() <= 1:
        return pairs[0][0], pairs[0][1].float().reshape(-1, dim)
    if len(pairs) == 1 and bool((pairs[0][0][1:] > pairs[0][0][:-1]).all()):
        return pairs[0][0], pairs[0][1].float().reshape(-1, dim)  # already unique and sorted
    ids = torch.cat([p[0] for p in pairs])
    grads = torch.cat([p[1].float() for p in pairs]).reshape(-1, dim)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    out = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=grads.device)
    out.index_add_(0, inverse, grads)
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
