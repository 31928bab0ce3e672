"""The learn method "new_rows": new knowledge = new rows, trained alone.

1. run the frozen model over the new text and keep the knowledge layers' queries
   where the new rows must answer (queries.py);
2. append rows keyed on them (plan.py: keys, selection biases, cue / gate / after
   tags, subject links, detectors), values small;
3. freeze every existing row, the detectors and every model parameter, and train only
   the new rows (values, and their keys at `key_lr`) with the store's sparse optimizer.

The model and every old row stay bitwise unchanged (tested).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import Batch
from ..gating import AFTER_TAG, CUE_TAG, DETECTOR_PARTITION, GATE_TAG
from ..model import Transformer
from .plan import plan_new_rows
from .registry import LearnMethod, LearnRun, register
from .row_optimizer import row_optimizer
from .steps import carry_grads_to_rows, freeze_model, train_steps


def train_new_rows(run: LearnRun) -> None:
    model, table, cfg = run.model, run.table, run.cfg
    freeze_model(model)
    guard = kl_guard(model, run.background[:cfg.guard_batches], cfg.guard_weight) \
        if run.background and cfg.guard_weight > 0 else None
    plan = plan_new_rows(model, run.examples, run.tok, cfg, run.background, first_id=run.old_ids.numel())
    values = torch.randn(plan.keys.shape[0], table.info().d_v,
                         generator=torch.Generator().manual_seed(cfg.seed)) * cfg.value_init_std
    detector = plan.is_detector                         # detectors and links
    values[detector] = 0.0                              # never read
    tags = {CUE_TAG: plan.cue, GATE_TAG: plan.gate} if plan.cue is not None else {}
    if plan.after is not None:
        tags[AFTER_TAG] = plan.after
    partition = torch.where(detector, DETECTOR_PARTITION, 0)     # never in the top-k (gating.py)
    run.result.new_ids = table.add_rows(values, plan.keys, plan.bias, tags=tags or None, partition=partition)
    run.stay_frozen = run.result.new_ids[detector]     # never read: nothing should move them
    table.set_frozen(run.old_ids, True)
    # Trained keys would carry the cue rows out of the place their calibration keeps
    # old text off, so with key_lr the cues stay as they were made (keys and values).
    if tags and cfg.key_lr > 0:
        cue_ids = run.result.new_ids[plan.cue >= 0]
        if cue_ids.numel():
            table.set_frozen(cue_ids, True)
    model.refresh_table_state()
    run.result.info.update(plan.info, new_rows=int(plan.keys.shape[0]))
    with row_optimizer(table, cfg.row_optimizer or "adam", run.lr, cfg.key_lr, bias_step=0.0):
        carry_grads_to_rows(model)
        try:
            run.result.losses = train_steps(model, table, run.loader, cfg, [], run.lr, extra_loss=guard)
        finally:
            freeze_model(model)


def kl_guard(model: Transformer, batches: Sequence[Batch], weight: float) -> Callable[[int], torch.Tensor]:
    """A loss that keeps the model's predictions on old text where they were:
    weight * KL(base || now), base taken now (before any new row exists). Only new
    rows can move, so it pushes their keys out of old contexts."""
    with torch.no_grad(), model.reading(readout="fetch"):
        was = model.training
        model.eval()
        base = [torch.log_softmax(model(b.inputs)[0], -1) for b in batches]
        model.train(was)

    def loss(step: int) -> torch.Tensor:
        i = step % len(batches)
        logp = torch.log_softmax(model(batches[i].inputs)[0], -1)
        return weight * (base[i].exp() * (base[i] - logp)).sum(-1).mean()
    return loss


NEW_ROWS = register(LearnMethod("new_rows", default_lr=1.0, run=train_new_rows))
