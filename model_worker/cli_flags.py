"""The flags of the training and generation command lines, defined once: `python -m
model_worker.train` / `.generate` and `kstore train` / `generate` all take these (the
training flags come from TrainConfig's fields, so they cannot drift). Importing this
module does not import torch, so `kstore --help` stays quick."""
from __future__ import annotations

import argparse
import dataclasses
import json

from .train_config import TrainConfig


def _bool(s: str) -> bool:
    return s.lower() in ("1", "true", "yes")


def add_train_arguments(ap: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--out-dir for out_dir, ...), and --resume."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model_overrides",):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = type(default) if default is not None else float
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            ap.add_argument(flag, type=_bool, default=default, metavar="true|false", help=f"default {default}")
        else:
            ap.add_argument(flag, type=kind, default=default, help=f"default {default}")
    ap.add_argument("--model-overrides", type=json.loads, default={}, help="JSON of ModelConfig fields")
    ap.add_argument("--resume", default=None, help="a checkpoint directory or an out_dir")


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """-> (TrainConfig, resume). From a command line a run always ends with a checkpoint
    (--ckpt-every 0 means: at the last step only), so that it can be used."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    resume = args.resume
    if resume and cfg.out_dir == "runs/default":
        cfg.out_dir = str(resume)
    if not cfg.ckpt_every:
        cfg.ckpt_every = cfg.steps
    return cfg, resume


def add_generate_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="a step directory written by training, or its run "
                                                        "directory (its latest step)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (with --temperature > 0)")
    ap.add_argument("--show-rows", action="store_true", help="print the rows the first answer token read")
    ap.add_argument("questions", nargs="+")
