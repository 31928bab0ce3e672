"""The training loop every learn method shares: the store applies row updates at each
step barrier, an AdamW steps whatever model parameters the method trains."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from store_service.interface import KnowledgeTable

from ..data import ExampleLoader
from ..model import Transformer
from .config import LearnConfig


def freeze_model(model: Transformer) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def carry_grads_to_rows(model: Transformer) -> list[nn.Parameter]:
    """Let gradients reach the readout (and so the rows) while the model is frozen:
    the codebooks require grad, their gradients are thrown away, they never move."""
    carriers = []
    for kl in model.knowledge_layers():
        for p in (kl.codebook_a, kl.codebook_b):
            p.requires_grad_(True)
            carriers.append(p)
    return carriers


def train_steps(model: Transformer, table: KnowledgeTable, loader: ExampleLoader, cfg: LearnConfig,
                params: list[nn.Parameter], lr: float, before_backward: Callable[[int], None] | None = None,
                extra_loss: Callable[[int], torch.Tensor] | None = None) -> list[float]:
    """cfg.steps steps on loader's batches: `params` (model parameters) by AdamW at `lr`,
    rows by the store at its step barrier; gradients of other parameters are dropped.
    Returns the loss of each step."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0) if params else None
    trainable = set(map(id, params))
    discard = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    step0 = table.info().step
    losses = []
    model.train()
    for s in range(cfg.steps):
        batch = loader.batch(s)
        with parametrize.cached():
            _, loss = model(batch.inputs, batch.targets)
        if before_backward is not None:
            before_backward(s)
        total = loss if extra_loss is None else loss + extra_loss(s)
        total.backward()
        if opt is not None:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p in discard:
            p.grad = None
        table.end_step(step0 + s)          # the store applies row gradients to unfrozen rows
        losses.append(float(loss.detach()))
    return losses
