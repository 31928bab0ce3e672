"""The learn methods `new_rows` is compared with (benchmarks/continual.py), with the same
data and step budget:

- "sparse_memory": sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103): per
  batch, rank existing rows by TF-IDF (term frequency = reads in the batch, document
  frequency = share of pretraining sequences that read the row), unfreeze only the
  top-t, train them with SGD; model frozen.
- "full_finetune": every model parameter (AdamW) and every row (the store's optimizer).
- "lora": low-rank adapters on the attention and expert weights (`LoRADelta`); rows and
  base weights frozen; the adapters are merged into the weights at the end.

full_finetune and lora with cfg.replay also train, each step, on one batch of old text
(`background`, cycled): replay, the standard mitigation of forgetting.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ..data import Batch
from ..model import Transformer
from ..reading import recording
from .registry import LearnMethod, LearnRun, register
from .row_optimizer import row_optimizer
from .steps import carry_grads_to_rows, freeze_model, train_steps


# -- sparse memory finetuning -------------------------------------------------------------

def sparse_memory_finetune(run: LearnRun) -> None:
    model, table, cfg = run.model, run.table, run.cfg
    n_old = run.old_ids.numel()
    freeze_model(model)
    df = document_frequency(model, run.background or [], n_old)
    n_bg = max(1, sum(b.inputs.shape[0] for b in run.background or []))
    idf = torch.log((n_bg + 1) / (df + 1))
    table.set_frozen(run.old_ids, True)
    opened = torch.zeros(0, dtype=torch.int64)   # the rows unfrozen for the current batch
    unfrozen: set[int] = set()

    with model.reading(record=True) as trace, row_optimizer(table, cfg.row_optimizer or "sgd", run.lr, bias_step=0.0):
        def choose_rows(step: int) -> None:
            """Unfreeze the top-t rows of this step's batch by TF-IDF (read in its forward)."""
            nonlocal opened
            tf = torch.zeros(n_old, dtype=torch.float64)
            for read in trace.take().values():
                ids = read.ids[read.weights > 0]
                ids = ids[(ids >= 0) & (ids < n_old)]
                tf += torch.bincount(ids, minlength=n_old).double()
            score = tf * idf
            top = score.topk(min(cfg.top_t, int((tf > 0).sum()) or 1)).indices
            if opened.numel():
                table.set_frozen(opened, True)
            table.set_frozen(top, False)
            opened = top
            unfrozen.update(top.tolist())

        carry_grads_to_rows(model)
        try:
            run.result.losses = train_steps(model, table, run.loader, cfg, [], run.lr, before_backward=choose_rows)
        finally:
            freeze_model(model)
    run.result.info["rows_updated"] = len(unfrozen)


@torch.no_grad()
def document_frequency(model: Transformer, batches: Sequence[Batch], n_rows: int) -> torch.Tensor:
    """Number of documents (sequences of `batches`) in which each row was read (weight > 0).
    Lin et al. take a batch as the document over a 1M-row memory; with a table of
    ~1k rows every row is read in every batch, so the idf would be 0 for all: a
    sequence is the document here."""
    df = torch.zeros(n_rows, dtype=torch.float64)
    with recording(model) as trace:
        for b in batches:
            model(b.inputs)
            reads = list(trace.take().values())
            for i in range(b.inputs.shape[0]):       # a document = one sequence
                used = torch.zeros(n_rows, dtype=torch.bool)
                for read in reads:
                    ids = read.ids[i][read.weights[i] > 0]
                    used[ids[(ids >= 0) & (ids < n_rows)]] = True
                df += used.double()
    return df


# -- replay ----------------------------------------------------------------------------------

def replay_loss(run: LearnRun):
    """With cfg.replay: step s adds the LM loss on background batch s (cycled), else None."""
    if not run.cfg.replay:
        return None
    if not run.background:
        raise ValueError("replay needs `background` batches of old text")
    batches, model = list(run.background), run.model

    def extra(s: int) -> torch.Tensor:
        b = batches[s % len(batches)]
        return model(b.inputs, b.targets)[1]
    return extra


# -- full finetuning -------------------------------------------------------------------------

def full_finetune(run: LearnRun) -> None:
    model, table, cfg = run.model, run.table, run.cfg
    for p in model.parameters():
        p.requires_grad_(True)
    table.set_frozen(run.old_ids, False)
    model_lr = cfg.model_lr if cfg.model_lr is not None else FULL_FINETUNE.default_lr
    # rows train with the table's own optimizer, unless the config names their lr
    rows = row_optimizer(table, cfg.row_optimizer or "adam", cfg.lr, bias_step=0.0) if cfg.lr \
        else contextlib.nullcontext()
    with rows:
        run.result.losses = train_steps(model, table, run.loader, cfg, list(model.parameters()), model_lr,
                                        extra_loss=replay_loss(run))
    freeze_model(model)


# -- LoRA --------------------------------------------------------------------------------------

class LoRADelta(nn.Module):
    """A parametrization W -> W + (alpha / r) A @ B for a weight [..., a, b]
    (a Linear's [out, in], or stacked experts [E, a, b]). B starts at zero, so
    the adapted model starts equal to the base one."""

    def __init__(self, shape: Sequence[int], rank: int, alpha: float):
        super().__init__()
        *batch, a, b = shape
        self.A = nn.Parameter(torch.randn(*batch, a, rank) * a ** -0.5)
        self.B = nn.Parameter(torch.zeros(*batch, rank, b))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.A @ self.B).to(w.dtype)


def lora_targets(model: Transformer) -> list[tuple[nn.Module, str]]:
    """Attention (wqkv, wo) and expert weights (routed w1/w2/w3, shared expert)."""
    out = []
    for block in model.layers:
        out += [(block.attention.wqkv, "weight"), (block.attention.wo, "weight")]
        ffn = block.ffn
        if ffn is None:
            continue
        if hasattr(ffn, "experts"):
            out += [(ffn.experts, n) for n in ("w1", "w2", "w3")]
            if ffn.shared is not None:
                out += [(m, "weight") for m in ffn.shared.modules() if isinstance(m, nn.Linear)]
        else:
            out += [(m, "weight") for m in ffn.modules() if isinstance(m, nn.Linear)]
    return out


def add_lora(model: Transformer, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Attach LoRA adapters; returns their parameters (the only trainable ones)."""
    params = []
    for mod, name in lora_targets(model):
        delta = LoRADelta(getattr(mod, name).shape, rank, alpha).to(getattr(mod, name).device)
        parametrize.register_parametrization(mod, name, delta)
        params += [delta.A, delta.B]
    return params


def merge_lora(model: Transformer) -> None:
    """Fold the adapters into the weights (W <- W + scale A B) and drop them."""
    for mod, name in lora_targets(model):
        if parametrize.is_parametrized(mod, name):
            parametrize.remove_parametrizations(mod, name, leave_parametrized=True)


def lora_finetune(run: LearnRun) -> None:
    model, table, cfg = run.model, run.table, run.cfg
    freeze_model(model)
    params = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    table.set_frozen(run.old_ids, True)
    model_lr = cfg.model_lr if cfg.model_lr is not None else LORA.default_lr
    run.result.losses = train_steps(model, table, run.loader, cfg, params, model_lr, extra_loss=replay_loss(run))
    merge_lora(model)
    freeze_model(model)


SPARSE_MEMORY = register(LearnMethod("sparse_memory", default_lr=100.0, run=sparse_memory_finetune))
FULL_FINETUNE = register(LearnMethod("full_finetune", default_lr=1e-3, run=full_finetune))
LORA = register(LearnMethod("lora", default_lr=1e-3, run=lora_finetune))
