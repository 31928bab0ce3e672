"""The store's row optimizers side by side: the quality benchmark's knowledge model
(benchmarks/quality.py, preset small-knowledge-2l) trained with each row optimizer of the
table on the same seeds, data and steps; held-out loss and recall against the bytes of
optimizer state each keeps per byte of values.

    nice -n 10 python benchmarks/optimizer_tradeoff.py --store-optimizers sgd,rowwise_adagrad,rowwise_adam,adam \\
        --seeds 0,1 --steps 400                              # the CPU check (optimizer_tradeoff.json)
    python benchmarks/optimizer_tradeoff.py --device cuda --steps 1500 --seeds 0,1,2 --jobs 8   # on a GPU

`--store-optimizers` takes kind[:lr] items (lr: that kind's row lr; default --value-lr,
else the preset's). Everything but the table's optimizer is the same across kinds. The
headline holds, per kind, the median over seeds with min and max of the final held-out
loss (every held-out batch by default) and held-out-phrasing recall (the first --recall-n
prompts), and the optimizer's bytes over the values' bytes as
the trained table measured them (store_service Shard.memory, step counts included).
Writes benchmarks/results/optimizer_tradeoff.json (and .png).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.quality import RUNS, base_config, device_string  # noqa: E402
from model_worker.data import ByteTokenizer  # noqa: E402
from model_worker.train import create_table, model_config, train  # noqa: E402
from store_service.optimizer import OPTIMIZER_KINDS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_optimizers(text: str) -> list[tuple[str, float | None]]:
    out = []
    for item in filter(None, text.split(",")):
        kind, _, lr = item.partition(":")
        if kind not in OPTIMIZER_KINDS:
            raise argparse.ArgumentTypeError(f"unknown store optimizer {kind!r}; known: {OPTIMIZER_KINDS}")
        out.append((kind, float(lr) if lr else None))
    return out


def _run(job) -> dict:
    args, kind, lr, seed, work = job
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = base_config(args, RUNS["knowledge"], str(Path(work) / f"{kind}_seed{seed}"), seed=seed,
                      table_optimizer=kind, value_lr=lr if lr is not None else args.value_lr,
                      eval_recall_n=args.recall_n, eval_loss_batches=args.loss_batches)
    table = create_table(model_config(cfg, ByteTokenizer().vocab_size), cfg)
    r = train(cfg, table=table)
    memory = [s.memory() for s in table.shards]
    last = r["evals"][-1]
    opt_bytes, value_bytes = sum(m["optimizer_bytes"] for m in memory), sum(m["value_bytes"] for m in memory)
    return {"optimizer": kind, "lr": table.shards[0]._serving.config.optimizer.lr, "seed": seed,
            "heldout_loss": last["heldout_loss"], "recall_heldout": last["recall_heldout"],
            "final_train_loss": r["final_loss"], "evals": r["evals"],
            "optimizer_bytes": opt_bytes, "value_bytes": value_bytes,
            "optimizer_over_values": opt_bytes / value_bytes, "wall_s": time.time() - t0}


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def headline(runs: list[dict], kinds: list[str]) -> dict:
    by = {k: [r for r in runs if r["optimizer"] == k] for k in kinds}
    return {k: {"heldout_loss": _spread([r["heldout_loss"] for r in rs]),
                "recall_heldout": _spread([r["recall_heldout"] for r in rs]),
                "optimizer_over_values": rs[0]["optimizer_over_values"], "lr": rs[0]["lr"]}
            for k, rs in by.items() if rs}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = result["headline"]["optimizers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("heldout_loss", "recall_heldout")):
        for k, v in h.items():
            s = v[metric]
            ax.errorbar([v["optimizer_over_values"]], [s["median"]], yerr=[[s["median"] - s["min"]],
                        [s["max"] - s["median"]]], fmt="o", capsize=4, label=k)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("optimizer bytes / value bytes")
        ax.set_ylabel(metric + " (median, min-max over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _provenance(argv: list[str], device: str) -> dict:
    if hasattr(common, "provenance"):          # benchmarks/common.py's helper, where present
        return common.provenance(argv, device=device)
    import datetime
    import os
    import platform
    import subprocess
    root = Path(__file__).resolve().parents[1]

    def git(*a):
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
            "command": " ".join(["python", "-m", "benchmarks.optimizer_tradeoff", *argv]),
            "machine": {"cpu_model": common.cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                        "hostname": platform.node()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": device,
            "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-optimizers", type=parse_optimizers,
                    default=parse_optimizers("sgd,rowwise_adagrad,rowwise_adam,adam"))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--evals", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--value-lr", type=float, default=None, help="the rows' lr for kinds given without one")
    ap.add_argument("--knowledge", default='{"n_sub": 128}')
    ap.add_argument("--knowledge-model", default="")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--corpus", default="medium")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--recall-n", type=int, default=256,
                    help="recall on the first n held-out-phrasing prompts (0: all; the CPU check samples)")
    ap.add_argument("--loss-batches", type=int, default=0, help="held-out loss batches (0: all)")
    ap.add_argument("--out", default=str(RESULTS / "optimizer_tradeoff.json"))
    args = ap.parse_args()
    prov = _provenance(sys.argv[1:], args.device)
    work = Path(tempfile.mkdtemp(prefix="kstore_opt_tradeoff_"))
    jobs = [(args, kind, lr, seed, str(work)) for seed in args.seeds for kind, lr in args.store_optimizers]
    runs = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for r in pool.imap_unordered(_run, jobs, chunksize=1):
            runs.append(r)
            print(f"{r['optimizer']:16s} seed {r['seed']} heldout_loss {r['heldout_loss']:.4f} recall "
                  f"{r['recall_heldout']:.3f} state/values {r['optimizer_over_values']:.4f} "
                  f"wall {r['wall_s']:.0f}s", flush=True)
    kinds = [k for k, _ in args.store_optimizers]
    config = {k: v for k, v in vars(args).items() if k != "store_optimizers"}
    config["store_optimizers"] = [{"kind": k, "lr": lr} for k, lr in args.store_optimizers]
    result = {"headline": {"optimizers": headline(runs, kinds), "seeds": args.seeds, "steps": args.steps,
                           "model": RUNS["knowledge"]},
              "device": f"{device_string(args.device)}; {args.jobs} run(s) in parallel, {args.threads} thread(s) each",
              "provenance": prov, "config": config,
              "runs": sorted(runs, key=lambda r: (kinds.index(r["optimizer"]), r["seed"]))}
    common.write_results(result, args.out, plot)


if __name__ == "__main__":
    main()
