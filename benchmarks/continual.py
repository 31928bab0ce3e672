"""Continual learning benchmark (issue 6): new rows vs sparse memory finetuning vs full finetuning vs LoRA.

    python -m benchmarks.continual --train-base            # the base model (once; runs/bench_base)
    python -m benchmarks.continual                         # -> benchmarks/results/continual.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

BASE_DIR = "runs/bench_base"
# The base model every issue-6 benchmark uses: the team's small MoE + knowledge preset,
# trained on the tiny corpus with its new facts held out of pretraining.
# Narrower than the preset (d_model 64, 8 experts, 32x32 product rows, k=8) so that the
# benchmarks fit in minutes on a shared 2-core CPU.
BASE = dict(model="small-knowledge", corpus="tiny", seq_len=64, batch_size=16, steps=800, lr=3e-3, warmup=50,
            model_overrides={"block_size": 128, "d_model": 64, "n_experts": 8,
                             "knowledge": {"layers": (2,), "placement": "replace", "n_heads": 4, "d_k": 32,
                                           "k": 8, "n_sub": 32}},
            eval_every=0, ckpt_every=200, progress=False)


def device_string() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} " \
           f"({torch.get_num_threads()} threads), CPU only"


def train_base(out: str = BASE_DIR, steps: int | None = None) -> Path:
    from model_worker.checkpoint import latest_checkpoint
    from model_worker.train import TrainConfig, train
    cfg = TrainConfig(**{**BASE, "out_dir": out, **({"steps": steps} if steps else {})})
    t0 = time.time()
    r = train(cfg)
    print(json.dumps({"base_train_s": time.time() - t0, "final_loss": r["final_loss"],
                      "tokens_per_s": r["tokens_per_s"]}))
    return latest_checkpoint(out)


def base_checkpoint(out: str = BASE_DIR) -> Path:
    from model_worker.checkpoint import latest_checkpoint
    ck = latest_checkpoint(out)
    if ck is None:
        ck = train_base(out)
    return ck


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-base", action="store_true")
    ap.add_argument("--base", default=BASE_DIR)
    ap.add_argument("--base-steps", type=int, default=None)
    args = ap.parse_args(argv)
    if args.train_base:
        print(train_base(args.base, args.base_steps))
        return


if __name__ == "__main__":
    main()
