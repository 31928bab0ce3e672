"""Continual learning benchmark (issue 6): new rows vs sparse memory finetuning vs full finetuning vs LoRA.

    python -m benchmarks.continual --train-base            # the base model (once; runs/bench_base_l1, ~5 min)
    python -m benchmarks.continual                         # -> benchmarks/results/continual.{json,png}

What earlier runs found, and how the defaults were chosen: benchmarks/CONTINUAL_NOTES.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_model, write_results
from benchmarks.continual_probes import novelty_probe, query_separation
from model_worker.checkpoint import latest_checkpoint, load_weights, open_checkpoint_table, read_meta
from model_worker.config import ModelConfig, configs
from model_worker.data import PackedLoader, build_corpus, tokenizer_from_dict
from model_worker.learn import LearnConfig, learn
from model_worker.learn.measure import forgetting, measure, new_row_interference, new_row_reads
from model_worker.learn.queries import background_queries
from model_worker.model import Transformer
from model_worker.train import TrainConfig, train
from store_service import persistence

BASE_DIR = "runs/bench_base"
DEFAULT_BASE_LAYER = 1   # the continual benchmark's base (interpret and knobs use block 2, BASE_DIR)
# The base recipe of the issue-6 benchmarks: the knowledge model of the quality
# benchmark (benchmarks/quality.py, seed 0: the small-knowledge preset with a 16k-row
# product segment; interpret and knobs use it as is, continual with the layer moved to
# DEFAULT_BASE_LAYER), trained on the medium corpus with its new facts held out of
# pretraining: ~640 old facts and 71 new ones, so that recall and forgetting move in
# steps of ~1/100 rather than the tiny corpus' ~1/16.
BASE = dict(model="small-knowledge", corpus="medium", seq_len=64, batch_size=32, steps=1500, lr=3e-3, warmup=40,
            model_overrides={"block_size": 128, "knowledge": {**configs["small-knowledge"]["knowledge"], "n_sub": 128}},
            eval_every=0, ckpt_every=500, progress=False, threads=1)


def device_string() -> str:
    cpu = cpu_model()
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} " \
           f"({torch.get_num_threads()} threads), CPU only"


def base_dir(layer: int | None, seed: int = 0) -> str:
    """Where the base with its knowledge layer in block `layer` lives (None: the quality model's block 2)."""
    return (BASE_DIR if layer is None else f"{BASE_DIR}_l{layer}") + (f"_s{seed}" if seed else "")


def base_settings(layer: int | None = None, seed: int = 0) -> dict:
    """BASE, with the knowledge layer moved to block `layer` and training seed `seed`
    (every other setting the same)."""
    out = {**BASE, "seed": seed}
    if layer is None:
        return out
    mo = BASE["model_overrides"]
    return {**out, "model_overrides": {**mo, "knowledge": {**mo["knowledge"], "layers": (layer,)}}}


def train_base(out: str = BASE_DIR, steps: int | None = None, layer: int | None = None, seed: int = 0) -> Path:
    cfg = TrainConfig(**{**base_settings(layer, seed), "out_dir": out, **({"steps": steps} if steps else {})})
    t0 = time.time()
    r = train(cfg)
    print(json.dumps({"base_train_s": time.time() - t0, "final_loss": r["final_loss"],
                      "tokens_per_s": r["tokens_per_s"]}))
    return latest_checkpoint(out)


def base_checkpoint(out: str = BASE_DIR, layer: int | None = None, seed: int = 0) -> Path:
    ck = latest_checkpoint(out)
    if ck is None:
        ck = train_base(out, layer=layer, seed=seed)
    return ck


# The compared methods with their tuned settings (how they were chosen: CONTINUAL_NOTES.md).
DEFAULT_CONFIGS = {
    "new_rows": {"method": "new_rows", "lr": 1.0, "select_bias": True, "key_margin": 3.0, "bg_quantile": 0.0,
                 "key_per_phrasing": True, "fact_rows": True, "subject_rows": 3, "select_margin": 0.0,
                 "gate_on_subject": True, "detectors": True, "cue_per_phrasing": True},
    # new_rows without one of its parts each
    "new_rows_no_detectors": {"method": "new_rows", "lr": 1.0, "select_bias": True, "key_margin": 3.0, "bg_quantile": 0.0,
                              "key_per_phrasing": True, "fact_rows": True, "subject_rows": 3, "select_margin": 0.0,
                              "gate_on_subject": True, "detectors": False, "cue_per_phrasing": True},
    "new_rows_subject_cue": {"method": "new_rows", "lr": 1.0, "select_bias": True, "key_margin": 3.0, "bg_quantile": 0.0,
                             "key_per_phrasing": True, "fact_rows": True, "subject_rows": 3, "select_margin": 0.0,
                             "gate_on_subject": True, "detectors": True, "cue_per_phrasing": False},
    "new_rows_ungated": {"method": "new_rows", "lr": 1.0, "select_bias": True, "key_margin": 3.0, "bg_quantile": 0.0,
                         "key_per_phrasing": True, "fact_rows": True, "subject_rows": 3, "select_margin": 0.0,
                         "gate_on_subject": False, "cue_per_phrasing": False},
    "sparse_memory": {"method": "sparse_memory", "lr": 100.0, "top_t": 64, "row_optimizer": "sgd"},
    "full_finetune": {"method": "full_finetune", "model_lr": 1e-3},
    "lora": {"method": "lora", "model_lr": 1e-3},
    "new_rows_reach": {"method": "new_rows", "lr": 0.3, "select_bias": True, "key_margin": 3.0, "bg_quantile": 1e-4,
                       "key_per_phrasing": True, "fact_rows": False, "subject_rows": 3, "gate_on_subject": False,
                       "cue_per_phrasing": False},
    "new_rows_strict": {"method": "new_rows", "lr": 0.3, "select_bias": True, "key_margin": 3.0, "bg_quantile": 0.0,
                        "key_per_phrasing": True, "fact_rows": True, "subject_rows": 3, "select_margin": 0.5, "gate_on_subject": False,
                        "cue_per_phrasing": False},
    "new_rows_capped": {"method": "new_rows", "lr": 0.3, "select_bias": False, "key_margin": 1.0, "bg_quantile": 0.0,
                        "key_per_phrasing": True, "fact_rows": False, "subject_rows": 0, "gate_on_subject": False},
}


def load_base(ckpt: Path, scratch: str):
    """The base checkpoint's model and a private copy of its table version under
    `scratch` (what a benchmark publishes never lands in the base store)."""
    meta = read_meta(ckpt)
    v = int(meta["table_version"])
    dst = persistence.version_path(scratch, v)
    if not os.path.isdir(dst):
        os.makedirs(scratch, exist_ok=True)
        shutil.copytree(persistence.version_path(meta["store_root"], v), dst)
    table = open_checkpoint_table({**meta, "store_root": scratch})
    model = Transformer(ModelConfig.from_dict(meta["model_config"]), table)
    load_weights(model, Path(ckpt) / "model.safetensors")
    torch.manual_seed(0)
    return model.eval(), tokenizer_from_dict(meta["tokenizer"]), table, meta


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint) if args.checkpoint else base_checkpoint(args.base, args.base_layer, args.base_seed)
    scratch = tempfile_root(args)
    model, tok, table, meta = load_base(ckpt, scratch)
    corpus = build_corpus(meta["train_config"]["corpus"])
    old_eval = corpus.eval[: args.old_n] if args.old_n else corpus.eval
    old_seen = corpus.eval_seen[: args.old_n] if args.old_n else corpus.eval_seen
    first = {}
    for e in corpus.new_train:                      # one taught phrasing per new fact
        first.setdefault((e.subject, e.relation), e)
    ev = dict(new_eval=corpus.new_eval, old_eval=old_eval, heldout_texts=corpus.heldout_texts,
              old_seen=old_seen if args.seen else (), new_seen=list(first.values()),
              loss_batches=args.loss_batches)
    t0 = time.time()
    base = measure(model, tok, **ev)
    base["seconds"] = time.time() - t0
    print("base", json.dumps(base), flush=True)
    bg_loader = PackedLoader(corpus.train_texts, tok, 64, 16, seed=1)
    background = [bg_loader.batch(i) for i in range(args.background_batches)]
    old_batches = [bg_loader.batch(1000 + i) for i in range(4)]
    bgq = background_queries(model, background)
    sep = query_separation(model, tok, corpus.new_train, corpus.new_eval, bgq)
    print("query_separation", json.dumps(sep), flush=True)
    probe = novelty_probe(model, tok, corpus.new_train, corpus.new_eval, old_eval, bgq)
    print("novelty_probe", json.dumps(probe), flush=True)
    methods = {}
    configs = {**DEFAULT_CONFIGS, **args.configs}
    for name in args.methods:
        model, tok, table, meta = load_base(ckpt, scratch)
        kw = {"steps": args.steps, "batch_size": args.batch_size, **configs[name]}
        res = learn(model, table, corpus.new_train, tok, LearnConfig(**kw), background=background, publish=False)
        t1 = time.time()
        after = measure(model, tok, **ev)
        after["eval_seconds"] = time.time() - t1
        fg = forgetting(base, after)
        entry = {"config": kw, "learn_seconds": res.seconds, **after, **fg,
                 "info": res.info, "loss_first": res.losses[0], "loss_last": sum(res.losses[-5:]) / 5,
                 "losses": res.losses}
        if res.new_ids is not None:
            first_new = int(res.new_ids.min())
            entry["interference_old_text"] = new_row_interference(model, old_batches, first_new)
            entry["reads"] = {"new_heldout_phrasing": new_row_reads(model, tok, corpus.new_eval, first_new),
                              "new_taught_phrasing": new_row_reads(model, tok, list(first.values()), first_new),
                              "old_heldout_phrasing": new_row_reads(model, tok, old_eval, first_new)}
        methods[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "losses"}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    headline = {
        "new_recall": {m: methods[m]["new_recall"] for m in methods},
        "new_recall_taught_phrasing": {m: methods[m]["new_seen_recall"] for m in methods},
        "forgetting": {m: methods[m]["recall_drop"] for m in methods},
        "heldout_loss_rise": {m: methods[m]["loss_rise"] for m in methods},
        **({"forgetting_seen_phrasing": {m: methods[m]["seen_recall_drop"] for m in methods},
            "base_old_seen_recall": base["old_seen_recall"]} if args.seen else {}),
        "base_old_recall": base["old_recall"], "base_new_recall": base["new_recall"],
        "steps": args.steps, "batch_size": args.batch_size,
        "new_facts": len(corpus.new_facts), "new_eval_prompts": len(corpus.new_eval), "old_eval_prompts": len(old_eval),
    }
    if "new_rows" in methods and "full_finetune" in methods:
        nr, ff = methods["new_rows"], methods["full_finetune"]
        headline["target_new_rows_forgetting_below_2pct"] = nr["recall_drop"] < 0.02
        headline["target_new_rows_recall_at_least_full_finetune"] = nr["new_recall"] >= ff["new_recall"]
    return {"benchmark": "continual", "device": device_string(), "headline": headline, "base": base,
            "query_separation": sep, "novelty_probe": probe,
            "base_checkpoint": str(ckpt), "model_config": meta["model_config"], "methods": methods,
            "notes": "forgetting = relative drop of exact-match recall of old facts on held-out phrasings; "
                     "new recall = exact match on the new facts' held-out phrasings (never trained on). "
                     "Same data (corpus.new_train, answer-only loss), steps and batch size for every method."}


def tempfile_root(args) -> str:
    return tempfile.mkdtemp(prefix="continual_", dir=args.scratch)


def plot(result: dict, path: str) -> None:
    import matplotlib  # deferred: matplotlib is a dev extra, needed only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(result["methods"])
    nr = [result["methods"][m]["new_recall"] for m in methods]
    fg = [100 * result["methods"][m]["recall_drop"] for m in methods]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ns = [result["methods"][m].get("new_seen_recall", float("nan")) for m in methods]
    x = range(len(methods))
    ax[0].bar([i - 0.2 for i in x], nr, 0.4, color="tab:blue", label="held-out phrasing")
    ax[0].bar([i + 0.2 for i in x], ns, 0.4, color="tab:cyan", label="taught phrasing")
    ax[0].axhline(result["base"]["new_recall"], ls="--", c="k", lw=1)
    ax[0].set_xticks(list(x), methods)
    ax[0].set_title("new-fact recall (dashed: base model)")
    ax[0].legend(fontsize=8)
    ax[0].set_ylim(0, 1)
    ax[1].bar(methods, fg, color="tab:red")
    ax[1].axhline(2, ls="--", c="k", lw=1)
    ax[1].set_title("forgetting: relative drop of old-fact recall (%)")
    for m in methods:
        ax[2].plot(result["methods"][m]["losses"], label=m)
    ax[2].set_title("training loss on the new facts")
    ax[2].set_xlabel("step")
    ax[2].legend()
    for a in ax[:2]:
        plt.setp(a.get_xticklabels(), rotation=30, ha="right")
    fig.suptitle(f"continual learning, {result['headline']['steps']} steps each; {result['device'][:90]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _no_nan(x):
    """NaN (not measured) -> null, so the file is strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-base", action="store_true", help="train the base model and stop")
    ap.add_argument("--base", default=None, help="base model directory (trained if it has no checkpoint; "
                                                 f"default {BASE_DIR}, or {BASE_DIR}_l<N> with --base-layer N)")
    ap.add_argument("--base-layer", type=int, default=DEFAULT_BASE_LAYER,
                    help="the base's knowledge layer in this block (default 1: two frozen blocks above it; "
                         "-1: block 2, the quality benchmark's model in runs/bench_base)")
    ap.add_argument("--base-steps", type=int, default=None)
    ap.add_argument("--base-seed", type=int, default=0,
                    help="the base's training seed (another seed: another base, in <base>_s<seed>)")
    ap.add_argument("--checkpoint", default=None, help="a step directory to use as the base instead")
    ap.add_argument("--methods", nargs="+", default=["new_rows", "sparse_memory", "full_finetune", "lora",
                                                     "new_rows_no_detectors", "new_rows_subject_cue",
                                                     "new_rows_ungated", "new_rows_capped"])
    ap.add_argument("--configs", type=json.loads, default={},
                    help='JSON: name -> LearnConfig fields, e.g. {"lora": {"method": "lora", "model_lr": 3e-3}}')
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--old-n", type=int, default=0, help="old-fact prompts to measure (0 = all)")
    ap.add_argument("--loss-batches", type=int, default=8)
    ap.add_argument("--seen", type=int, default=0, help="also measure old facts on a trained phrasing (1/0)")
    ap.add_argument("--background-batches", type=int, default=128,
                    help="pretraining batches of 16 x 64 tokens (128: all of the medium corpus' old text)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", default="runs")
    ap.add_argument("--out", default="benchmarks/results/continual.json")
    args = ap.parse_args(argv)
    if args.base_layer is not None and args.base_layer < 0:
        args.base_layer = None
    args.base = args.base or base_dir(args.base_layer, args.base_seed)
    if args.train_base:
        print(train_base(args.base, args.base_steps, args.base_layer, args.base_seed))
        return
    os.makedirs(args.scratch, exist_ok=True)
    t0 = time.time()
    result = run(args)
    result["wall_seconds"] = time.time() - t0
    write_results(_no_nan(result), args.out, plot)


if __name__ == "__main__":
    main()
