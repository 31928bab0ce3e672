"""Checkpoints that are consistent cuts (DESIGN.md section 4).

A checkpoint of step s is one directory:

    step_{s:06d}/
        model.safetensors    model weights and persistent buffers (balancing biases)
        train_state.pt       torch optimizer state, data loader position, step
        meta.json            step, the store's published table version at step s,
                             store root, model / train / table configs

The table version is published (`table.snapshot()`) between steps, after
`table.end_step(s - 1)`, so the store and the model are cut at the same step.
The directory is written under a temporary name and renamed into place, then
`latest` is updated: a half-written checkpoint is never visible.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from store_service.interface import KnowledgeTable

from .model import Transformer


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:06d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    p = Path(out_dir) / "latest"
    if not p.exists():
        return None
    d = Path(out_dir) / p.read_text().strip()
    return d if d.exists() else None


def save_checkpoint(out_dir: str | Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    loader_state: dict, table: KnowledgeTable | None, meta: dict[str, Any]) -> Path:
    """Publish the table at this step, then write the model side. Returns the directory."""
    version = table.snapshot() if table is not None else None
    final = step_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "loader": loader_state, "step": step},
               tmp / "train_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "table_version": version}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = Path(out_dir) / "latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, Path(out_dir) / "latest")
    return final


@dataclass
class Restored:
    step: int
    loader_state: dict
    meta: dict


def read_meta(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_checkpoint(ckpt: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
                    table: KnowledgeTable | None) -> Restored:
    """Restore both halves of the cut: the table is hot-swapped to the published
    version of that step, the model, optimizer and data position loaded."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if table is not None and meta.get("table_version") is not None:
        table.load_version(int(meta["table_version"]))
        model.refresh_table_state()
    load_model(model, str(ckpt / "model.safetensors"), strict=True)
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return Restored(int(state["step"]), state["loader"], meta)


def load_for_inference(ckpt: str | Path):
    """-> (model in eval mode with its table attached, tokenizer, meta) from a step directory,
    with the table opened in-process from the store root at the checkpoint's version."""
    from .config import ModelConfig
    from .data import tokenizer_from_dict
    from .train import open_table

    meta = read_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    table = open_table(meta["store_root"], meta["table_version"]) if cfg.knowledge is not None else None
    model = Transformer(cfg, table)
    load_model(model, str(Path(ckpt) / "model.safetensors"), strict=True)
    return model.eval(), tokenizer_from_dict(meta["tokenizer"]), meta
