"""Training: a straight line (nanoGPT style).

config -> data -> table -> model -> optimizer -> loop { forward, backward
(row gradients go to the store), optimizer step (model), balancing biases,
table.end_step (rows, at the step barrier), eval, checkpoint }.

    python -m model_worker.train --model small-knowledge --steps 600 --out runs/kn
    python -m model_worker.train --resume runs/kn          # continue from runs/kn/latest

In code:

    result = train(TrainConfig(model="tiny-knowledge", steps=50, out_dir=d))
    result = train(TrainConfig(...), table=connect(addresses, token=TOKEN))   # a remote table (store_service/auth.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from store_service.config import OptimizerConfig, TableConfig
from store_service.interface import KnowledgeTable
from store_service.table import Table

from . import evaluate
from .cli_flags import add_train_arguments, train_config_from_args
from .checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from .config import ModelConfig, preset
from .distributed import DataParallel
from .data import ByteTokenizer, PackedLoader, build_corpus, packed_batches
from .generate import generate_fn
from .model import Transformer
from .progress import progress_bar as default_progress_bar
from .train_config import TrainConfig


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return preset(cfg.model, **{"vocab_size": vocab_size, "block_size": max(cfg.seq_len, 64),
                                **cfg.model_overrides})


def table_config(mcfg: ModelConfig, cfg: TrainConfig) -> TableConfig:
    """The table a knowledge model needs: a product segment of n_sub^2 rows (row
    ids [0, n_sub^2); its codebooks are the model's) then optional flat rows."""
    kn = mcfg.knowledge
    segments = [("product", kn.n_sub)] + ([("flat", cfg.flat_rows)] if cfg.flat_rows else [])
    lr = kn.value_lr if cfg.value_lr is None else cfg.value_lr
    return TableConfig(d_k=kn.d_k, d_v=kn.d_v, segments=segments, num_shards=cfg.num_shards,
                       optimizer=OptimizerConfig(kind=cfg.table_optimizer, lr=lr),
                       init_scale=kn.value_init_std or kn.d_v ** -0.5, bias_step=cfg.table_bias_step,
                       seed=cfg.seed, device=cfg.device)


def create_table(mcfg: ModelConfig, cfg: TrainConfig, store_root: str | None = None) -> KnowledgeTable:
    return Table.create(table_config(mcfg, cfg), store_root or str(Path(cfg.out_dir) / "store"))


def open_table(store_root: str, version: int | None = None) -> KnowledgeTable:
    return Table.open(store_root, version)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "codebook" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "codebook" not in n)]
    # On a GPU the fused kernel: a small model is bound by kernel launches, and the per-tensor
    # loop costs ~10 launches per parameter tensor per step. On the CPU the plain loop, as before.
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             eps=1e-8, fused=fused, foreach=False)


@torch.no_grad()
def evaluate_model(model: Transformer, tok, corpus, cfg: TrainConfig) -> dict:
    """Held-out loss (held-out phrasings) and fact recall on held-out phrasings.
    Reads rows by fetch, so evaluation leaves the store's usage counts alone."""
    model.eval()
    with model.reading(readout="fetch"):
        batches = packed_batches(corpus.heldout_texts, tok, cfg.seq_len, cfg.batch_size)
        if cfg.eval_loss_batches:
            batches = batches[: cfg.eval_loss_batches]
        dev = model.output.weight.device
        loss = evaluate.heldout_loss(lambda b: model(b.inputs.to(dev), b.targets.to(dev))[1], batches)["loss"]
        n = cfg.eval_recall_n or len(corpus.eval_prompts)
        rec = evaluate.fact_recall(generate_fn(model, tok), corpus.eval_prompts[:n], corpus.eval_answers[:n],
                                   corpus.eval_fact_types[:n], batch_size=cfg.eval_batch_size)
    model.train()
    return {"heldout_loss": loss, "recall_heldout": rec["recall"]}


def train(cfg: TrainConfig, *, table: KnowledgeTable | None = None, resume: str | Path | None = None,
          stop_at: int | None = None, data_parallel: DataParallel | None = None,
          step_hook: Callable[[int], None] | None = None, progress_bar: Callable = default_progress_bar) -> dict:
    """Run (or resume) training. `table`: use this table instead of creating an
    in-process one (e.g. a gRPC client); `resume`: a checkpoint directory, or an
    out_dir whose `latest` is used; `stop_at`: stop after this step (checkpointing
    it) without changing the schedule, to test resumption.
    `data_parallel`: this worker's rank among W workers sharing one store (each
    trains on batches step*W + rank; rank 0 evaluates and checkpoints);
    `step_hook(done_steps)`: called between steps, after any checkpoint (the
    cluster scales the store there); `progress_bar`: a tqdm-like factory (default: a live bar
    in a terminal, a line per 10% otherwise).
    Returns {"losses": [...], "evals": [...], "tokens_per_s", "params", "final_loss", ...}."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # data
    tok = ByteTokenizer()
    corpus = build_corpus(cfg.corpus)
    loader = PackedLoader(corpus.train_texts, tok, cfg.seq_len, cfg.batch_size, seed=cfg.seed)

    # model and table
    mcfg = model_config(cfg, tok.vocab_size)
    if mcfg.knowledge is not None and table is None:
        table = create_table(mcfg, cfg)
    model = Transformer(mcfg, table if mcfg.knowledge is not None else None).to(cfg.device)
    optimizer = make_optimizer(model, cfg)
    start = 0
    if resume is not None:
        ckpt = Path(resume)
        if not (ckpt / "meta.json").exists():
            ckpt = latest_checkpoint(ckpt)
        restored = load_checkpoint(ckpt, model, optimizer, table if mcfg.knowledge is not None else None)
        start = restored.step
        loader.load_state_dict(restored.loader_state)
    table = table if mcfg.knowledge is not None else None
    meta = {"model_config": mcfg.to_dict(), "train_config": dataclasses.asdict(cfg),
            "tokenizer": tok.to_dict(), "corpus_fingerprint": corpus.fingerprint(),
            "store_root": getattr(table, "store_root", None)}

    history: dict[str, Any] = {"losses": [], "evals": [], "loads": [], "params": model.count_params()}
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    model.train()
    tokens, t_train = 0, 0.0
    dp = data_parallel
    rank, world = (dp.rank, dp.world_size) if dp is not None else (0, 1)
    bar = progress_bar(range(start, end), initial=start, total=end, disable=not cfg.progress or rank != 0,
                       desc=cfg.model)
    for step in bar:
        if cfg.eval_every and step % cfg.eval_every == 0 and step > start and rank == 0:
            history["evals"].append({"step": step, **evaluate_model(model, tok, corpus, cfg)})
        t0 = time.perf_counter()
        batch = next(loader) if dp is None else loader.batch(step * world + rank)
        if cfg.device != "cpu":
            batch = batch.to(cfg.device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits, loss = model(batch.inputs, batch.targets)
        ((loss + model.aux_loss()) / world).backward()  # row and flat-key gradients go to the store here
        if dp is not None:
            dp.all_reduce_grads(model)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dp is not None:
            dp.all_reduce_loads(model)
        loads = model.end_step()                   # MoE and product-key balancing biases
        if table is not None:                      # step barrier: the store applies the row gradients
            table.end_step(step, worker=rank, num_workers=world)
        history["losses"].append(loss.item())   # waits for the step on a GPU: time it inside t_train
        t_train += time.perf_counter() - t0
        tokens += batch.inputs.numel()
        if loads and step % 10 == 0:
            history["loads"].append({"step": step, **{k: v.tolist() for k, v in loads.items()}})
        bar.set_postfix(loss=f"{history['losses'][-1]:.4f}", tok_s=f"{tokens / t_train:.0f}")
        done = step + 1
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or (done == end and (cfg.ckpt_every or stop_at)):
            if rank == 0:
                save_checkpoint(out, done, model, optimizer, loader.state_dict(), table, meta)
            if dp is not None:
                dp.barrier()
        if step_hook is not None:
            step_hook(done)
    if cfg.eval_every and end == cfg.steps and rank == 0:
        history["evals"].append({"step": end, **evaluate_model(model, tok, corpus, cfg)})
    history.update(final_loss=history["losses"][-1] if history["losses"] else float("nan"),
                   tokens_per_s=tokens / t_train if t_train else 0.0, tokens=tokens, start_step=start,
                   end_step=end)
    history["model"] = model
    return history


def run(args: argparse.Namespace) -> dict:
    """Train as the command line asks, in this process; prints and returns the summary."""
    cfg, resume = train_config_from_args(args)
    table = None
    if resume and preset(cfg.model).knowledge is not None:
        ckpt = Path(resume) if (Path(resume) / "meta.json").exists() else latest_checkpoint(resume)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint under {resume} to resume from")
        meta = read_meta(ckpt)
        table = open_table(meta["store_root"], meta["table_version"])
    result = train(cfg, table=table, resume=resume)
    summary = {k: v for k, v in result.items() if k in ("final_loss", "tokens_per_s", "evals", "params")}
    summary["checkpoint"] = str(latest_checkpoint(cfg.out_dir))
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a model (dense / MoE / MoE + knowledge).")
    add_train_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
