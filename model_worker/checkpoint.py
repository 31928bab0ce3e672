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

A derived checkpoint (`derive_checkpoint`: after learn, ablate, reorder) is a step
directory without train_state.pt whose meta points at a newer table version.
Checkpoints written before parameters were renamed load unchanged (`load_weights`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model

from store_service.interface import KnowledgeTable
from store_service.table import Table

from .config import ModelConfig
from .data import ByteTokenizer, tokenizer_from_dict
from .learn.migrate import migrate
from .model import Transformer

# Parameter names renamed since checkpoints were first written (old -> new, as name suffixes).
RENAMED_PARAMETERS = {".router.gate.weight": ".router.proj.weight"}


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


def load_weights(model: Transformer, path: str | Path, device: str = "cpu") -> None:
    """Load model.safetensors into `model`, strictly (every parameter and persistent
    buffer), under today's names (RENAMED_PARAMETERS). Tied weights are stored once,
    under one of their names."""
    state = {_renamed(name): t for name, t in load_file(str(path), device=device).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [m for m in missing if not tied.get(m, set()) & state.keys()]
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def _renamed(name: str) -> str:
    for old, new in RENAMED_PARAMETERS.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _tied_names(model: Transformer) -> dict[str, set[str]]:
    """name -> the other names of the same tensor (e.g. output.weight and tok_embeddings.weight)."""
    by_storage: dict[int, set[str]] = defaultdict(set)
    for name, t in model.state_dict().items():
        by_storage[t.data_ptr()].add(name)
    return {n: names - {n} for names in by_storage.values() for n in names}


def load_checkpoint(ckpt: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
                    table: KnowledgeTable | None) -> Restored:
    """Restore both halves of the cut: the table is hot-swapped to the published
    version of that step, the model, optimizer and data position loaded."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if table is not None and meta.get("table_version") is not None:
        table.load_version(int(meta["table_version"]))
        model.refresh_table_state()
    load_weights(model, ckpt / "model.safetensors")
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return Restored(int(state["step"]), state["loader"], meta)


def open_checkpoint_table(meta: dict) -> Table:
    """The in-process table of a checkpoint (its store root at its version); a version
    written before detectors had their own partition is migrated first (learn/migrate.py)."""
    migrate(meta["store_root"], int(meta["table_version"]))
    return Table.open(meta["store_root"], meta["table_version"])


def load_for_inference(ckpt: str | Path, table=None) -> tuple[Transformer, ByteTokenizer, dict]:
    """-> (model in eval mode with its table attached, tokenizer, meta) from a step directory,
    with the table opened in-process from the store root at the checkpoint's version, or
    `table` (e.g. a cluster's serving table) when given."""
    meta = read_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    if cfg.knowledge is None:
        table = None
    elif table is None:
        table = open_checkpoint_table(meta)
    model = Transformer(cfg, table)
    load_weights(model, Path(ckpt) / "model.safetensors")
    return model.eval(), tokenizer_from_dict(meta["tokenizer"]), meta


def derive_checkpoint(src: str | Path, dst: str | Path, meta: dict, version: int,
                      model: Transformer | None = None, **extra: Any) -> Path:
    """A checkpoint directory for a new table version derived from the checkpoint `src`:
    the same model weights (copied bitwise, or `model`'s when given), meta pointing at
    `version` (and `derived_from`, and any `extra` keys). Written under a temporary name
    and renamed into place."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model is None:
        shutil.copy2(src / "model.safetensors", tmp / "model.safetensors")
    else:
        save_model(model, str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "table_version": version, "derived_from": str(src),
                                               **extra}, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst
