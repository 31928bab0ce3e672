"""Deployment knobs benchmark (issue 6): k at inference, row reordering, hot-row cache.

    python -m benchmarks.knobs          # -> benchmarks/results/knobs.{json,png}

- k sweep: fact recall (held-out phrasings) and speed for k = 1 .. k_train.
- reorder: rows laid out by co-occurrence (rows read by the same token, learned on the
  training texts), published as a new version with ids remapped; locality measured on
  held-out texts: distinct 4 KiB pages and contiguous id runs touched per token (what a
  decode step fetches) and per 16 and 256 tokens.
- cache: the table served by a gRPC shard server; generation in fetch mode (batch 1)
  with no cache, an LRU and an LFU hot-row cache: hit rate and tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

from benchmarks.common import write_results
from benchmarks.continual import base_checkpoint, device_string, load_base
from model_worker import evaluate
from model_worker import reorder as R
from model_worker.data import ByteTokenizer, build_corpus, packed_batches
from model_worker.generate import generate, generate_fn
from model_worker.model import Transformer
from store_service.cached_table import CachedTable
from store_service.client import connect
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table


def timed_generation(model: Transformer, tok: ByteTokenizer, prompts: Sequence[str], max_new_tokens: int = 16
                     ) -> tuple[float, int]:
    """(seconds, generated tokens) for greedy answers to prompts, one prompt at a time
    (batch 1: the setting where fetch mode and a cache matter)."""
    n = 0
    t0 = time.perf_counter()
    for p in prompts:
        out = generate(model, torch.tensor([tok.encode(p, bos=True)]), max_new_tokens, eos_id=tok.eos_id)
        n += out.tokens.numel()
    return time.perf_counter() - t0, n


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or base_checkpoint(args.base)
    scratch = tempfile.mkdtemp(prefix="knobs_", dir=args.scratch)
    model, tok, table, meta = load_base(ckpt, scratch)
    corpus = build_corpus(meta["train_config"]["corpus"])
    kl = model.knowledge_layers()[0]
    k_train = kl.k
    evals = corpus.eval[: args.old_n] if args.old_n else corpus.eval
    batch = packed_batches(corpus.heldout_texts, tok, 64, 16)[0]

    # -- k sweep
    ks = sorted({k for k in [1, 2, 4, 8, 16, 32] if k <= k_train} | {k_train})
    k_sweep = []
    for k in ks:
        with model.reading(k=k), torch.no_grad():
            t0 = time.perf_counter()
            rec = evaluate.recall_on_examples(generate_fn(model, tok), evals)["recall"]
            gen_s = time.perf_counter() - t0
            model(batch.inputs)
            t0 = time.perf_counter()
            for _ in range(args.fwd_reps):
                model(batch.inputs)
            fwd_s = (time.perf_counter() - t0) / args.fwd_reps
        e = {"k": k, "recall": rec, "recall_eval_seconds": gen_s, "forward_tokens_per_s": batch.inputs.numel() / fwd_s}
        k_sweep.append(e)
        print(json.dumps(e), flush=True)

    # -- reorder
    train_trace = R.usage_trace(model, tok, corpus.train_texts[: args.trace_docs], per="token")
    eval_trace = R.usage_trace(model, tok, corpus.heldout_texts[: args.trace_docs], per="token")
    info = table.info()
    plan = R.cooccurrence_order(train_trace, info.num_rows, kl.n)
    version = info.version
    new_version = R.publish_reordered(scratch, version, plan)
    with torch.no_grad():
        ref = model(batch.inputs)[0]
    new_table = Table.open(scratch, new_version)
    R.permute_model(model, plan)
    model.attach_table(new_table)
    with torch.no_grad():
        same = float((model(batch.inputs)[0] - ref).abs().max())
    eval_after = R.usage_trace(model, tok, corpus.heldout_texts[:4], per="token")
    remap_ok = all(torch.equal(torch.sort(plan.remap(a)).values, b) for a, b in zip(eval_trace, eval_after))
    row_bytes = info.d_v * (2 if info.value_dtype == "bfloat16" else 4)
    page_rows = max(1, 4096 // row_bytes)
    reorder = {"from_version": version, "published_version": new_version, "max_abs_logit_diff": same,
               "ids_remapped_consistently": remap_ok, "page_rows": page_rows, "row_bytes": row_bytes}
    for group in (1, 16, 256):
        before = R.locality(eval_trace, page_rows, group)
        after = R.locality([plan.remap(t) for t in eval_trace], page_rows, group)
        reorder[f"tokens_per_batch_{group}"] = {"before": before, "after": after,
                                              "pages_ratio": after["pages"] / before["pages"],
                                              "runs_ratio": after["runs"] / before["runs"]}
    print(json.dumps(reorder), flush=True)
    model, tok, table, meta = load_base(ckpt, scratch)

    # -- hot-row cache over gRPC
    prompts = [e.prompt for e in corpus.eval[: args.cache_prompts]]
    server = serve_shard(Shard.load(scratch, version, 0), admin_token="bench")
    cache = {}
    try:
        remote = connect([server.address], admin_token="bench", store_root=scratch)
        # each policy starting empty, and LFU preloaded with the rows the store's usage counts say are hot
        runs = [("none", 0, None, False)] + [(f"{p}_{c}", c, p, False) for c in args.cache_rows for p in ("lru", "lfu")] \
            + [(f"lfu_{c}_warm", c, "lfu", True) for c in args.cache_rows]
        for name, cap, policy, warm in runs:
            t = remote if policy is None else CachedTable(remote, cap, policy)
            model.attach_table(t)
            timed_generation(model, tok, prompts[:2], args.max_new_tokens)     # warm up gRPC
            rates = []
            for _ in range(args.cache_repeats):        # each repeat from the same start (empty or warmed)
                if policy is not None:
                    t.clear()
                    t.reset_stats()
                    if warm:
                        t.warm()
                        t.reset_stats()
                sec, n = timed_generation(model, tok, prompts, args.max_new_tokens)
                rates.append(n / sec)
            e = {"capacity_rows": cap, "share_of_table": cap / info.num_rows, "seconds": n / statistics.median(rates),
                 "tokens": n, "tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates}
            if policy is not None:
                e.update(t.stats())
            cache[name] = e
            print(name, json.dumps(e), flush=True)
        remote.close()
    finally:
        server.stop()
    for name in cache:      # medians over the repeats, with the range of run-by-run ratios to the median uncached
        cache[name]["speedup"] = cache[name]["tokens_per_s"] / cache["none"]["tokens_per_s"]
        cache[name]["speedup_min_max"] = [min(cache[name]["tokens_per_s_runs"]) / cache["none"]["tokens_per_s"],
                                          max(cache[name]["tokens_per_s_runs"]) / cache["none"]["tokens_per_s"]]
    shutil.rmtree(scratch, ignore_errors=True)
    kmax = k_sweep[-1]
    half = next((e for e in k_sweep if e["k"] == k_train // 2), k_sweep[0])
    g16 = reorder["tokens_per_batch_1"]
    headline = {
        "k_train": k_train,
        "recall_by_k": {str(e["k"]): e["recall"] for e in k_sweep},
        "forward_speedup_half_k": half["forward_tokens_per_s"] / kmax["forward_tokens_per_s"],
        "reorder_pages_per_token": [g16["before"]["pages"], g16["after"]["pages"]],
        "reorder_runs_per_token": [g16["before"]["runs"], g16["after"]["runs"]],
        "reorder_pages_ratio": g16["pages_ratio"], "reorder_same_function": same < 1e-4 and remap_ok,
        "cache_capacity_rows": args.cache_rows, "table_rows": info.num_rows,
        "cache_hit_rate": {n: cache[n]["hit_rate"] for n in cache if n != "none"},
        "cache_fetch_calls_served_without_rpc": {n: cache[n]["call_hit_rate"] for n in cache if n != "none"},
        "cache_generation_speedup": {n: cache[n]["speedup"] for n in cache if n != "none"},
        "cache_generation_speedup_min_max": {n: cache[n]["speedup_min_max"] for n in cache if n != "none"},
        "cache_repeats": args.cache_repeats,
    }
    return {"benchmark": "knobs", "device": device_string(), "headline": headline, "k_sweep": k_sweep,
            "reorder": reorder, "cache": cache, "base_checkpoint": str(ckpt),
            "notes": "cache: one gRPC shard server on loopback in this process; generation batch 1, greedy, "
                     f"{args.max_new_tokens} new tokens max, {len(prompts)} prompts."}


def plot(result: dict, path: str) -> None:
    import matplotlib  # deferred: matplotlib is a dev extra, needed only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ks = [e["k"] for e in result["k_sweep"]]
    ax[0].plot(ks, [e["recall"] for e in result["k_sweep"]], marker="o", label="recall")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("k at inference")
    ax[0].set_ylabel("recall (held-out phrasings)")
    a2 = ax[0].twinx()
    a2.plot(ks, [e["forward_tokens_per_s"] for e in result["k_sweep"]], marker="s", c="tab:orange", label="tok/s")
    a2.set_ylabel("forward tokens/s")
    ax[0].set_title("k sweep")
    r = result["reorder"]
    labels = ["pages/token", "runs/token", "pages/16 tokens", "runs/16 tokens"]
    before = [r["tokens_per_batch_1"]["before"]["pages"], r["tokens_per_batch_1"]["before"]["runs"],
              r["tokens_per_batch_16"]["before"]["pages"], r["tokens_per_batch_16"]["before"]["runs"]]
    after = [r["tokens_per_batch_1"]["after"]["pages"], r["tokens_per_batch_1"]["after"]["runs"],
             r["tokens_per_batch_16"]["after"]["pages"], r["tokens_per_batch_16"]["after"]["runs"]]
    x = range(len(labels))
    ax[1].bar([i - 0.2 for i in x], before, 0.4, label="trained order")
    ax[1].bar([i + 0.2 for i in x], after, 0.4, label="reordered")
    ax[1].set_xticks(list(x), labels, fontsize=8)
    ax[1].set_title(f"fetch locality ({r['page_rows']} rows per 4 KiB page)")
    ax[1].legend()
    c = result["cache"]
    names = list(c)
    ax[2].bar(names, [c[n]["tokens_per_s"] for n in names])
    for i, n in enumerate(names):
        if "hit_rate" in c[n]:
            ax[2].text(i, c[n]["tokens_per_s"], f"{c[n]['hit_rate']:.2f}", ha="center", va="bottom", fontsize=8)
    ax[2].tick_params(axis="x", rotation=45)
    ax[2].set_title("generation over gRPC (fetch, batch 1): tokens/s\nrow hit rate on the bars", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/bench_base")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--old-n", type=int, default=128)
    ap.add_argument("--fwd-reps", type=int, default=3)
    ap.add_argument("--trace-docs", type=int, default=1076)
    ap.add_argument("--cache-rows", type=int, nargs="+", default=[512, 2048, 8192, 16384],
                    help="cache capacities in rows (the base's table has 16,384)")
    ap.add_argument("--cache-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", default="runs")
    ap.add_argument("--cache-repeats", type=int, default=3, help="timed generations per cache setting (median)")
    ap.add_argument("--out", default="benchmarks/results/knobs.json")
    args = ap.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    t0 = time.time()
    result = run(args)
    result["wall_seconds"] = time.time() - t0
    write_results(result, args.out, plot)


if __name__ == "__main__":
    main()
