"""The store's row optimizers side by side (issue 20), under issue 24's rules: the quality
benchmark's knowledge model (benchmarks/quality.py, preset small-knowledge-2l) trained
with each row optimizer of the table, each at its own row learning rate chosen on a
tuning half; held-out loss and recall on the test half against the bytes of optimizer
state each keeps per byte of values.

    python benchmarks/optimizer_tradeoff.py --device cuda --steps 1500 --jobs 12 --eval-batch-size 1024
        # on an H100: 4 kinds x 3 lrs x 1 tuning seed + 4 kinds x 3 reported seeds = 24 runs
    python benchmarks/optimizer_tradeoff.py --model tiny-knowledge --knowledge '{}' --corpus tiny \\
        --steps 5 --out /tmp/ot.json                 # a CPU smoke run (seconds per run)

Protocol (as the quality benchmark's, benchmarks/quality_protocol.py): the trained facts'
held-out-phrasing prompts and held-out loss texts are split by fact (--split-seed) into a
tuning half and a test half. Every kind gets the same lr grid: --lr-grid factors (default
0.1, 1, 10) times the kind's centre (`--store-optimizers kind[:centre]`; DEFAULT_CENTRES
says where the centres come from). Each (kind, lr) trains once per --tune-seeds seed and
is scored on the tuning half only; per kind, the lr with the best tuning-half recall (ties:
lower tuning-half held-out loss) is chosen (quality_protocol.choose); the chosen lr then
trains once per --seeds seed (disjoint from the tuning seeds), scored on the test half
only. Everything but the table's optimizer and its lr is the same across runs. The
headline holds, per kind, the chosen lr, the median with min and max over the reported
seeds of the test half's held-out loss and recall, and the optimizer's bytes over the
values' bytes as the trained table measured them (store_service Shard.memory, step counts
included); the JSON's `tuning` holds every trial's tuning-half metrics.

Every finished run is written at once to <out>.parts.json: a call cut off by a time limit
keeps them; `--reuse <that file>` (same commit, same settings) trains only the missing runs.
Writes benchmarks/results/optimizer_tradeoff.json (and .png).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.quality import RUNS, base_config, device_string, split_summary  # noqa: E402
from benchmarks.quality_protocol import choose, evaluate_half, spread, split_examples  # noqa: E402
from model_worker.config import KnowledgeConfig, configs  # noqa: E402
from model_worker.data import ByteTokenizer, build_corpus  # noqa: E402
from model_worker.train import create_table, model_config, train  # noqa: E402
from store_service.optimizer import OPTIMIZER_KINDS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The centre of each kind's grid, fixed before any run. The adaptive kinds divide the
# gradient by its own scale, so their step is about lr per element: the preset's row lr
# (0.05, what the quality benchmark uses) is their centre. SGD's step is lr * g, and a
# row's gradient of the mean loss is tiny (a row gets a few of the step's 2,048 tokens'
# reads, each weighted by a softmax over 16 rows): ~1e-5 to 1e-4 per element, so SGD needs
# an lr ~1e3 times larger for a step of the same size (the continual benchmark's
# sparse-memory SGD, on the same rows, changed no answer at lr 100 and is tuned around 1000).
DEFAULT_CENTRES = {"sgd": 1000.0}


def parse_optimizers(text: str) -> list[tuple[str, float | None]]:
    out = []
    for item in filter(None, text.split(",")):
        kind, _, lr = item.partition(":")
        if kind not in OPTIMIZER_KINDS:
            raise argparse.ArgumentTypeError(f"unknown store optimizer {kind!r}; known: {OPTIMIZER_KINDS}")
        out.append((kind, float(lr) if lr else None))
    return out


def centre(args, kind: str, given: float | None) -> float:
    """A kind's grid centre: given with the kind, else DEFAULT_CENTRES, else --value-lr,
    else the preset's row lr."""
    if given is not None:
        return given
    if kind in DEFAULT_CENTRES:
        return DEFAULT_CENTRES[kind]
    if args.value_lr is not None:
        return args.value_lr
    return configs[args.model]["knowledge"].get("value_lr", KnowledgeConfig.value_lr)


def grid(args) -> dict[str, list[float]]:
    """{kind: its lrs}: the same factors (--lr-grid) times each kind's centre."""
    return {k: [float(f"{centre(args, k, c) * f:.6g}") for f in args.lr_grid] for k, c in args.store_optimizers}


def job_key(phase: str, kind: str, lr: float, seed: int) -> str:
    return f"{phase}/{kind}/{lr:g}/{seed}"


def _run(job) -> dict:
    """Train the knowledge model with one row optimizer and lr; evaluate one half (the
    tuning half for a tuning run, the test half for a reported run)."""
    args, phase, kind, lr, seed, work = job
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = base_config(args, args.model, str(Path(work) / f"{phase}_{kind}_{lr:g}_seed{seed}"), seed=seed,
                      table_optimizer=kind, value_lr=lr, eval_every=0)
    table = create_table(model_config(cfg, ByteTokenizer().vocab_size), cfg)
    r = train(cfg, table=table)
    memory = [s.memory() for s in table.shards]
    half = split_examples(build_corpus(cfg.corpus), args.split_seed)[phase]
    ev = evaluate_half(r["model"], half, cfg.seq_len, cfg.batch_size, args.eval_batch_size, seen=False)
    opt_bytes, value_bytes = sum(m["optimizer_bytes"] for m in memory), sum(m["value_bytes"] for m in memory)
    return {"phase": phase, "optimizer": kind, "lr": table.shards[0]._serving.config.optimizer.lr, "seed": seed,
            "heldout_loss": ev["heldout_loss"], "recall_heldout": ev["recall_heldout"], "n_prompts": ev["n"],
            "final_train_loss": r["final_loss"], "optimizer_bytes": opt_bytes, "value_bytes": value_bytes,
            "optimizer_over_values": opt_bytes / value_bytes, "wall_s": time.time() - t0}


def tuning_record(lrs: dict[str, list[float]], runs: dict, tune_seeds: list) -> dict:
    """Per kind: the trials, each lr's tuning-half metrics (mean over tuning seeds), and the
    lr chosen from those alone."""
    out = {}
    for kind, ks in lrs.items():
        metrics = {f"{lr:g}": [runs[job_key("tune", kind, lr, s)] for s in tune_seeds] for lr in ks}
        win = choose({k: [{"recall_heldout": r["recall_heldout"], "heldout_loss": r["heldout_loss"]} for r in rs]
                      for k, rs in metrics.items()})
        out[kind] = {"trials": len(ks) * len(tune_seeds), "winner_lr": float(win),
                     "tried": [{"lr": float(k), "tune_recall_heldout": sum(r["recall_heldout"] for r in rs) / len(rs),
                                "tune_heldout_loss": sum(r["heldout_loss"] for r in rs) / len(rs)}
                               for k, rs in metrics.items()]}
    return out


def headline(tuning: dict, runs: dict, seeds: list) -> dict:
    out = {}
    for kind, t in tuning.items():
        rs = [runs[job_key("test", kind, t["winner_lr"], s)] for s in seeds]
        out[kind] = {"lr": t["winner_lr"], "heldout_loss": spread([r["heldout_loss"] for r in rs]),
                     "recall_heldout": spread([r["recall_heldout"] for r in rs]),
                     "optimizer_over_values": rs[0]["optimizer_over_values"]}
    return out


def reuse(args, path: Path) -> tuple[dict, dict]:
    """Finished runs of an earlier call (its result or .parts.json) at this commit with
    these settings (SystemExit otherwise; --force-reuse takes another commit's, marked)."""
    old = json.loads(path.read_text())
    marked = common.check_reuse(old, args.force_reuse, f"--reuse {path}")
    same = ("model", "steps", "seq_len", "batch_size", "lr", "knowledge", "knowledge_model", "warmup", "corpus",
            "device", "split_seed")
    diff = {k: (old["config"].get(k), getattr(args, k)) for k in same if old["config"].get(k) != getattr(args, k)}
    if diff:
        raise SystemExit(f"--reuse {path}: trained with other settings (earlier, now): {diff}")
    runs = old.get("runs", {})
    print(f"reusing {len(runs)} runs from {path}", flush=True)
    return runs, {"from": str(path), "runs": sorted(runs), **marked}


def run_all(args, work: Path, result: dict, runs: dict) -> dict:
    """Tuning runs first; once a kind's are done its lr is chosen and its reported runs
    are queued. Each finished run goes to <out>.parts.json at once."""
    lrs = grid(args)
    parts = Path(args.out).with_suffix(".parts.json")
    parts.parent.mkdir(parents=True, exist_ok=True)
    tuning: dict = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}

        def submit(phase, kind, lr, seed):
            if job_key(phase, kind, lr, seed) not in runs:
                pending[pool.submit(_run, (args, phase, kind, lr, seed, str(work)))] = None

        def maybe_choose(kind):
            if kind not in tuning and all(job_key("tune", kind, lr, s) in runs
                                          for lr in lrs[kind] for s in args.tune_seeds):
                tuning[kind] = tuning_record({kind: lrs[kind]}, runs, args.tune_seeds)[kind]
                print(f"{kind}: chose lr {tuning[kind]['winner_lr']:g} on the tuning half", flush=True)
                for s in args.seeds:
                    submit("test", kind, tuning[kind]["winner_lr"], s)

        for kind, ks in lrs.items():
            for lr in ks:
                for s in args.tune_seeds:
                    submit("tune", kind, lr, s)
        for kind in lrs:
            maybe_choose(kind)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.pop(fut)
                r = fut.result()
                runs[job_key(r["phase"], r["optimizer"], r["lr"], r["seed"])] = r
                parts.write_text(json.dumps({**result, "tuning": tuning, "runs": runs}, indent=1))
                print(f"{r['phase']:4s} {r['optimizer']:16s} lr {r['lr']:<8g} seed {r['seed']:3d} heldout_loss "
                      f"{r['heldout_loss']:.4f} recall {r['recall_heldout']:.3f} state/values "
                      f"{r['optimizer_over_values']:.4f} wall {r['wall_s']:.0f}s", flush=True)
                maybe_choose(r["optimizer"])
    return {k: tuning[k] for k in lrs}


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
                        [s["max"] - s["median"]]], fmt="o", capsize=4, label=f"{k} (lr {v['lr']:g})")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("optimizer bytes / value bytes")
        ax.set_ylabel(metric + ", test half (median, min-max over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-optimizers", type=parse_optimizers,
                    default=parse_optimizers("sgd,rowwise_adagrad,rowwise_adam,adam"),
                    help="kind[:centre] items: the row optimizers, each with the centre of its lr grid")
    ap.add_argument("--lr-grid", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.1, 1.0, 10.0],
                    help="factors of each kind's centre: its lrs (the same factors for every kind)")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="the reported seeds (test half)")
    ap.add_argument("--tune-seeds", type=_ints, default=[100], help="the tuning seeds (tuning half)")
    ap.add_argument("--split-seed", type=int, default=24)
    ap.add_argument("--model", default=RUNS["knowledge"], help="a knowledge preset (tiny-knowledge: a smoke run)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--evals", type=int, default=1, help="(unused: the runs evaluate once, at the end)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="the model's (not the rows') lr")
    ap.add_argument("--value-lr", type=float, default=None,
                    help="the centre for kinds given without one and not in DEFAULT_CENTRES (default: the preset's)")
    ap.add_argument("--knowledge", default='{"n_sub": 128}')
    ap.add_argument("--knowledge-model", default="")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--corpus", default="medium")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation call (GPU: ~1024)")
    ap.add_argument("--reuse", default=None, help="an earlier call's result or .parts.json: its finished runs are kept")
    ap.add_argument("--force-reuse", action="store_true", help="take --reuse runs from another commit (marked)")
    ap.add_argument("--out", default=str(RESULTS / "optimizer_tradeoff.json"))
    args = ap.parse_args(argv)
    if set(args.seeds) & set(args.tune_seeds):
        ap.error(f"--tune-seeds {args.tune_seeds} and --seeds {args.seeds} must be disjoint")
    if configs.get(args.model, {}).get("knowledge") is None:
        ap.error(f"--model {args.model!r} is not a knowledge preset")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    prov = common.provenance(sys.argv[1:] if argv is None else argv, device=args.device)
    work = Path(tempfile.mkdtemp(prefix="kstore_opt_tradeoff_"))
    config = {k: v for k, v in vars(args).items() if k != "store_optimizers"}
    config["store_optimizers"] = [{"kind": k, "centre": centre(args, k, c)} for k, c in args.store_optimizers]
    result = {"provenance": prov, "config": config, "lr_grid": grid(args),
              "device": f"{device_string(args.device)}; {args.jobs} run(s) in parallel, {args.threads} thread(s) each",
              "split": {k: v for k, v in split_summary(build_corpus(args.corpus), args.split_seed).items()
                        if k != "test_fact_of_prompt"}}
    runs: dict = {}
    if args.reuse:
        runs, result["reused"] = reuse(args, Path(args.reuse))
    tuning = run_all(args, work, result, runs)
    result.update(tuning=tuning, runs=runs,
                  headline={"optimizers": headline(tuning, runs, args.seeds), "seeds": args.seeds,
                            "tuning_seeds": args.tune_seeds, "lr_grid_factors": args.lr_grid,
                            "tuning_trials_per_kind": {k: t["trials"] for k, t in tuning.items()},
                            "steps": args.steps, "model": args.model, "split": result["split"],
                            "protocol": "each kind's row lr chosen on the tuning half (tuning seeds) from the same "
                                        "grid of factors around its centre; reported on the test half (reported seeds)"})
    common.write_result(args.out, result, device=args.device, plot=plot)
    Path(args.out).with_suffix(".parts.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
