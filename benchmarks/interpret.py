"""Interpretability benchmark (issue 6): ablation selectivity, usage statistics.

    python -m benchmarks.interpret      # -> benchmarks/results/interpret.{json,png}

Ablation: for groups of facts the base model recalls, ablate (admin API) the rows
their answers read most (ranked by TF-IDF against a pass over the training texts),
and measure the recall of those facts and of other recalled facts; the same number
of random used rows is the control. Selectivity = drop of the ablated facts' recall
- drop of the others'.
Usage: fraction of rows used, KL of usage from uniform, top-1% share (Lample et
al. 2019), from the store's training counts and from one eval pass; histogram.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.common import write_results
from benchmarks.continual import base_checkpoint, device_string, load_base
from model_worker import evaluate
from model_worker import interpret as I
from model_worker.data import build_corpus
from model_worker.generate import generate_fn
from store_service.usage import usage_histogram, usage_summary


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or base_checkpoint(args.base)
    scratch = tempfile.mkdtemp(prefix="interpret_", dir=args.scratch)
    model, tok, table, meta = load_base(ckpt, scratch)
    corpus = build_corpus(meta["train_config"]["corpus"])
    gen = generate_fn(model, tok)

    # usage: the store's own counts (training) and one eval pass (with per-row contexts)
    t0 = time.time()
    ctx, eval_usage = I.collect_row_contexts(model, tok, corpus.train_texts[: args.context_docs], m=args.m)
    contexts_seconds = time.time() - t0
    train_usage = table.usage()
    usage = {"store_training_counts": usage_summary(train_usage), "eval_pass": usage_summary(eval_usage)}
    hist = {"store_training_counts": usage_histogram(train_usage), "eval_pass": usage_histogram(eval_usage)}

    # which facts the model gets right (on a trained phrasing by default: more of them)
    pool = corpus.eval_seen if args.phrasing == "seen" else corpus.eval
    rec = evaluate.recall_on_examples(gen, pool, return_predictions=True)
    right = [e for e, p in zip(pool, rec["predictions"])
             if evaluate.normalize_answer(p) == evaluate.normalize_answer(e.answer)]
    rng = random.Random(0)
    rng.shuffle(right)
    groups = [right[i * args.group_size:(i + 1) * args.group_size] for i in range(args.groups)]
    groups = [g for g in groups if len(g) == args.group_size]
    used_rows = (train_usage.hits > 0).nonzero().squeeze(1)

    def recall(examples):
        return evaluate.recall_on_examples(gen, examples)["recall"] if examples else float("nan")

    results = []
    for gi, group in enumerate(groups):
        others = [e for e in right if e not in group][: args.others]
        rows = I.answer_rows(model, tok, group, per_fact=max(args.per_fact),
                             background=eval_usage.weight_sum if args.tfidf else None)
        for r in args.per_fact:
            ids = torch.unique(torch.cat([x[:r] for x in rows]))
            with I.ablated(model, ids):
                tgt, oth = recall(group), recall(others)
            g = torch.Generator().manual_seed(gi * 100 + r)
            rand = used_rows[torch.randperm(used_rows.numel(), generator=g)[: ids.numel()]]
            with I.ablated(model, rand):
                rtgt, roth = recall(group), recall(others)
            entry = {"group": gi, "rows_per_fact": r, "rows_ablated": int(ids.numel()),
                     "share_of_table": ids.numel() / train_usage.hits.numel(),
                     "target_recall_after": tgt, "others_recall_after": oth,
                     "target_drop": 1 - tgt, "others_drop": 1 - oth,
                     "random_rows_target_drop": 1 - rtgt, "random_rows_others_drop": 1 - roth}
            results.append(entry)
            print(json.dumps(entry), flush=True)
    summary = {}
    for r in args.per_fact:
        es = [e for e in results if e["rows_per_fact"] == r]
        if not es:
            continue
        mean = lambda k: sum(e[k] for e in es) / len(es)
        summary[str(r)] = {k: mean(k) for k in ("rows_ablated", "share_of_table", "target_drop", "others_drop",
                                               "random_rows_target_drop", "random_rows_others_drop")}
        summary[str(r)]["selectivity"] = summary[str(r)]["target_drop"] - summary[str(r)]["others_drop"]
        # the spread over fact groups: the standard error of each group's selectivity
        sel = [e["target_drop"] - e["others_drop"] for e in es]
        summary[str(r)]["selectivity_se"] = statistics.stdev(sel) / len(sel) ** 0.5 if len(sel) > 1 else None
        summary[str(r)]["groups"] = len(es)
    example = I.explain(model, tok, corpus.eval[0].prompt if not right else right[0].prompt, contexts=ctx,
                        max_new_tokens=12, top_rows=3, top_contexts=2)
    shutil.rmtree(scratch, ignore_errors=True)
    headline = {
        # every ablation size, each with its spread over fact groups (no best-of pick)
        "ablation_by_rows_per_fact": {r: {k: s[k] for k in ("target_drop", "others_drop", "random_rows_target_drop",
                                                            "selectivity", "selectivity_se", "groups")}
                                      for r, s in summary.items()},
        "ablated_facts": sum(len(g) for g in groups),
        "usage_fraction_used": usage["store_training_counts"]["fraction_used"],
        "usage_kl_from_uniform": usage["store_training_counts"]["kl_from_uniform"],
        "usage_top1pct_share": usage["store_training_counts"]["top_share"],
        "eval_pass_fraction_used": usage["eval_pass"]["fraction_used"],
        "facts_recalled_by_base": len(right), "facts": len(pool), "phrasing": args.phrasing,
        "row_ranking": "tf-idf" if args.tfidf else "weight",
    }
    return {"benchmark": "interpret", "device": device_string(), "headline": headline,
            "ablation": {"by_rows_per_fact": summary, "runs": results, "group_size": args.group_size,
                         "others_per_group": args.others},
            "usage": usage, "histograms": hist, "row_contexts_seconds": contexts_seconds,
            "row_contexts_docs": min(args.context_docs, len(corpus.train_texts)), "explain_example": example,
            "base_checkpoint": str(ckpt)}


def plot(result: dict, path: str) -> None:
    import matplotlib  # deferred: matplotlib is a dev extra, needed only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for a, (name, (edges, counts)) in zip(ax[:2], result["histograms"].items()):
        if edges:
            a.bar(edges[:-1], counts, width=[b - a_ for a_, b in zip(edges[:-1], edges[1:])], align="edge")
        u = result["usage"][name]
        a.set_title(f"{name}: used {u['fraction_used']:.2f}, KL {u['kl_from_uniform']:.2f}, "
                    f"top1% {u['top_share']:.2f}", fontsize=9)
        a.set_xlabel("log10(1 + reads of a row)")
        a.set_ylabel("rows")
    s = result["ablation"]["by_rows_per_fact"]
    xs = [int(k) for k in s]
    for key, label in (("target_drop", "ablated facts"), ("others_drop", "other facts"),
                       ("random_rows_target_drop", "random rows: same facts")):
        ax[2].plot(xs, [s[str(x)][key] for x in xs], marker="o", label=label)
    ax[2].set_xscale("log", base=2)
    ax[2].set_xlabel("rows ablated per fact")
    ax[2].set_ylabel("recall drop")
    ax[2].set_title("ablation selectivity")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/bench_base")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=6)
    ap.add_argument("--others", type=int, default=40)
    ap.add_argument("--per-fact", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--phrasing", choices=["seen", "heldout"], default="seen",
                    help="facts (and their rows) on a trained phrasing or the held-out one")
    ap.add_argument("--tfidf", type=int, default=1, help="rank a fact's rows by TF-IDF against the eval pass (1/0)")
    ap.add_argument("--m", type=int, default=8, help="top contexts kept per row")
    ap.add_argument("--context-docs", type=int, default=1076)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", default="runs")
    ap.add_argument("--out", default="benchmarks/results/interpret.json")
    args = ap.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    t0 = time.time()
    result = run(args)
    result["wall_seconds"] = time.time() - t0
    write_results(result, args.out, plot)


if __name__ == "__main__":
    main()
