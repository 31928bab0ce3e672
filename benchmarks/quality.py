"""Quality at matched active parameters: dense vs MoE vs MoE + knowledge (and a
dense model with twice the knowledge model's active parameters), the same
training tokens, on this CPU. Also: training throughput with the table served
by 2 gRPC shard processes on loopback vs the in-process table.

    python benchmarks/quality.py                      # ~15-20 min on 2 shared CPU cores
    python benchmarks/quality.py --steps 100 --quick  # smoke run

Writes benchmarks/results/quality.json and quality.png (recall vs training steps).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402

from model_worker.remote_table import loopback_table  # noqa: E402
from model_worker.train import TrainConfig, model_config, table_config, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"dense": "small-dense", "dense_2x": "small-dense-2x", "moe": "small-moe", "knowledge": "small-knowledge"}


def device_string() -> str:
    cpu = cpu_model()
    return f"CPU: {cpu}, {os.cpu_count()} cores visible (shared with other jobs), torch {torch.__version__}"


def base_config(args, model: str, out_dir: str, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(model=model, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                                 lr=args.lr, warmup=args.warmup, corpus=args.corpus,
                                 eval_every=max(1, args.steps // args.evals), eval_recall_n=0, eval_loss_batches=0,
                                 value_lr=args.value_lr, out_dir=out_dir, progress=args.progress, seed=args.seed),
                          **kw})


def throughput(args, work: Path) -> dict:
    """The same knowledge-model run (no eval) with the in-process table and with 2 loopback shard servers."""
    out = {}
    for name in ("local", "remote"):
        cfg = base_config(args, RUNS["knowledge"], str(work / f"tput_{name}"), steps=args.tput_steps,
                          eval_every=0, num_shards=2)
        if name == "local":
            r = train(cfg)
        else:
            tcfg = table_config(model_config(cfg, 260), cfg)
            with loopback_table(tcfg, str(work / "tput_remote" / "store")) as table:
                r = train(cfg, table=table)
        out[name] = {"tokens_per_s": r["tokens_per_s"], "final_loss": r["final_loss"], "losses": r["losses"]}
    out["remote_over_local"] = out["remote"]["tokens_per_s"] / out["local"]["tokens_per_s"]
    out["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in zip(out["remote"]["losses"], out["local"]["losses"]))
    for name in ("local", "remote"):
        out[name].pop("losses")
    return out


def _quality_run(job) -> dict:
    args, key, work = job
    torch.set_num_threads(args.threads)
    t0 = time.time()
    r = train(base_config(args, RUNS[key], str(Path(work) / key)))
    return {"preset": RUNS[key], "params": r["params"], "evals": r["evals"], "final_train_loss": r["final_loss"],
            "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"], "wall_s": time.time() - t0,
            "model_config": r["model"].cfg.to_dict()}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        steps = [e["step"] for e in r["evals"]]
        label = f"{name} ({r['params']['active'] / 1e3:.0f}k active)"
        a.plot(steps, [e["recall_heldout"] for e in r["evals"]], marker="o", label=label)
        b.plot(steps, [e["heldout_loss"] for e in r["evals"]], marker="o", label=label)
    a.set(xlabel="training step", ylabel="fact recall, held-out phrasings", title="Recall vs training steps")
    b.set(xlabel="training step", ylabel="held-out loss (nats/token)", title="Held-out text loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--evals", type=int, default=8, help="evaluations per run")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--value-lr", type=float, default=None, help="the table's row lr (default: the preset's)")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--corpus", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tput-steps", type=int, default=60)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--jobs", type=int, default=2, help="quality runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kstore_quality_"))
    results: dict = {"device": f"{device_string()}; {args.jobs} runs in parallel, {args.threads} torch thread(s) each", "command": " ".join(["python"] + sys.argv), "config": vars(args),
                     "runs": {}}
    keys = args.runs.split(",")
    # Runs are independent: run them in `--jobs` processes of one torch thread each
    # (on a small shared CPU, one thread per process wastes far less time on contention).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs) as pool:
        for key, r in zip(keys, pool.map(_quality_run, [(args, key, str(work)) for key in keys])):
            results["runs"][key] = r
            last = r["evals"][-1]
            print(f"{key:10s} active {r['params']['active']:>9,d} total {r['params']['total']:>10,d} "
                  f"recall {last['recall_heldout']:.3f} heldout_loss {last['heldout_loss']:.4f} "
                  f"tok/s {r['tokens_per_s']:.0f} wall {r['wall_s']:.0f}s", flush=True)
    if not args.no_throughput:
        torch.set_num_threads(args.threads)
        results["throughput"] = throughput(args, work)
        print("throughput", json.dumps(results["throughput"]), flush=True)

    runs = results["runs"]
    final = {k: r["evals"][-1] for k, r in runs.items()}
    results["headline"] = {
        "recall_heldout": {k: final[k]["recall_heldout"] for k in final},
        "heldout_loss": {k: final[k]["heldout_loss"] for k in final},
        "active_params": {k: runs[k]["params"]["active"] for k in runs},
        "total_params": {k: runs[k]["params"]["total"] for k in runs},
        "remote_over_local_tokens_per_s": results.get("throughput", {}).get("remote_over_local"),
        "training_tokens": {k: runs[k]["tokens"] for k in runs},
    }
    if "knowledge" in final:
        kn = final["knowledge"]["recall_heldout"]
        results["headline"]["knowledge_recall_minus"] = {k: kn - final[k]["recall_heldout"]
                                                         for k in final if k != "knowledge"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["headline"], indent=2))


if __name__ == "__main__":
    main()
