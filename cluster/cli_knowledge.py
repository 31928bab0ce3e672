"""`kstore` verbs for what the knowledge store is for: learn, explain, ablate, usage, reorder.

They run in-process: the checkpoint's store root is opened with `Table.open`
(no Ray needed), and whatever they change is published as a new store version
next to the checkpoint's, with a new checkpoint directory that points at it.

    kstore learn --checkpoint runs/x/step_000800 --corpus-new          # the corpus' held-out facts
    kstore learn --checkpoint runs/x/step_000800 --facts new.txt       # lines "prompt<TAB>answer[<TAB>subject]"
    kstore explain --checkpoint runs/x/step_000800 "The capital of France is"
    kstore ablate --checkpoint runs/x/step_000800 --rows 12,40:48 "The capital of France is"
    kstore usage --checkpoint runs/x/step_000800
    kstore reorder --checkpoint runs/x/step_000800

The benchmarks run on their own (`python -m benchmarks.continual`, `.interpret`, `.knobs`).
The model_worker imports are inside the commands: `kstore --help` and the cluster verbs
start without loading torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_args import CliError, parse_ids


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _load(ckpt: str):
    from model_worker.checkpoint import latest_checkpoint, load_for_inference
    if not (Path(ckpt) / "meta.json").exists():
        found = latest_checkpoint(ckpt)
        if found is None:
            raise CliError(f"{ckpt} is neither a checkpoint step directory nor a run directory with one")
        ckpt = str(found)
    model, tok, meta = load_for_inference(ckpt)
    if not model.knowledge_layers():
        raise CliError(f"{ckpt} is a model without knowledge layers")
    return Path(ckpt), model, tok, meta, model.tables()[0]


# -- learn -----------------------------------------------------------------------------

def cmd_learn(args) -> None:
    from model_worker.checkpoint import derive_checkpoint
    from model_worker.data import PackedLoader, build_corpus
    from model_worker.learn import LearnConfig, facts_from_lines, learn
    from model_worker.learn.measure import forgetting, measure
    ckpt, model, tok, meta, table = _load(args.checkpoint)
    corpus = None
    if args.facts:
        examples = facts_from_lines(Path(args.facts).read_text().splitlines())
        if not examples:
            raise CliError(f"no facts in {args.facts} (lines 'prompt<TAB>answer[<TAB>subject]')")
    else:
        corpus = build_corpus(args.corpus or meta["train_config"]["corpus"])
        examples = corpus.new_train
    given = {k: v for k, v in dict(batch_size=args.batch_size, key_lr=args.key_lr, key_margin=args.key_margin,
                                   top_t=args.top_t).items() if v is not None}   # the rest: LearnConfig's defaults
    cfg = LearnConfig(method=args.method, steps=args.steps, lr=args.lr, gate_on_subject=not args.no_gate,
                      detectors=not args.no_detectors, **given)
    if args.lr is not None and args.method in ("full_finetune", "lora"):
        cfg.model_lr, cfg.lr = args.lr, None
    before = None
    if corpus is not None and args.measure:
        before = measure(model, tok, new_eval=corpus.new_eval, old_eval=corpus.eval[:args.measure],
                         heldout_texts=corpus.heldout_texts)
    # old (pretraining) text: calibrates new keys so old contexts do not select them,
    # and gives sparse memory finetuning its document frequencies
    pre = corpus if corpus is not None else build_corpus(meta["train_config"]["corpus"])
    bg = PackedLoader(pre.train_texts, tok, 64, 16, seed=1)
    background = [bg.batch(i) for i in range(args.background_batches)]
    res = learn(model, table, examples, tok, cfg, background=background, publish=True)
    out = Path(args.out) if args.out else ckpt.parent / f"learned_v{res.version:08d}"
    model_arg = None if args.method in ("new_rows", "sparse_memory") else model
    # what each cue / detector label stands for, so that `explain` can name the gates it opens
    labels = {str(k): v for k, v in res.info.get("labels", {}).items()}
    learned = {**meta.get("learned", {}), "method": args.method, "facts": len(examples),
               "labels": {**meta.get("learned", {}).get("labels", {}), **labels}}
    derive_checkpoint(ckpt, out, meta, res.version, model=model_arg, learned=learned)
    report = {"method": args.method, "facts": len(examples), "steps": args.steps,
              "new_rows": int(res.new_ids.numel()) if res.new_ids is not None else 0,
              "cue_rows": res.info.get("cue_rows", 0), "gated_rows": res.info.get("gated_rows", 0),
              "detector_rows": res.info.get("detector_rows", 0), "link_rows": res.info.get("link_rows", 0),
              "published_version": res.version, "checkpoint": str(out),
              "loss_first": res.losses[0], "loss_last": res.losses[-1], "seconds": round(res.seconds, 1),
              "model_weights_changed": args.method in ("full_finetune", "lora")}
    if before is not None:
        after = measure(model, tok, new_eval=corpus.new_eval, old_eval=corpus.eval[:args.measure],
                        heldout_texts=corpus.heldout_texts)
        report.update(before=before, after=after, forgetting=forgetting(before, after))
    _print(report)


# -- explain / ablate / usage ---------------------------------------------------------------

def _contexts(args, model, tok, meta, table):
    from model_worker import interpret as I
    from model_worker.data import build_corpus
    path = I.row_contexts_path(table.store_root, table.info().version)
    if Path(path).exists() and not args.recollect:
        return I.RowContexts.load(path)
    if args.no_contexts:
        return None
    texts = build_corpus(meta["train_config"]["corpus"]).train_texts
    print(f"collecting per-row top contexts over {len(texts)} training texts (once; saved to {path})",
          file=sys.stderr)
    ctx, _ = I.collect_row_contexts(model, tok, texts, m=8)
    ctx.save(path)
    return ctx


def cmd_explain(args) -> None:
    from model_worker import interpret as I
    ckpt, model, tok, meta, table = _load(args.checkpoint)
    ctx = _contexts(args, model, tok, meta, table)
    labels = {int(k): v for k, v in meta.get("learned", {}).get("labels", {}).items()}
    for prompt in args.prompts:
        e = I.explain(model, tok, prompt, contexts=ctx, max_new_tokens=args.max_new_tokens, top_rows=args.top_rows,
                      labels=labels)
        if args.json:
            _print(e)
        else:
            print(I.format_explanation(e, only_answer=args.answer_only))


def cmd_ablate(args) -> None:
    from model_worker import interpret as I
    from model_worker.checkpoint import derive_checkpoint
    from model_worker.generate import answer
    ckpt, model, tok, meta, table = _load(args.checkpoint)
    ids = parse_ids(args.rows)
    before = answer(model, tok, args.prompts)
    with I.ablated(model, ids) as fresh:
        after = answer(model, tok, args.prompts)
        if args.publish:
            version = table.snapshot()
            out = derive_checkpoint(ckpt, ckpt.parent / f"ablated_v{version:08d}", meta, version)
            print(f"published version {version} with rows ablated; checkpoint {out}", file=sys.stderr)
    _print({"rows_ablated": fresh.tolist(),
            "answers": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(args.prompts, before, after)]})


def cmd_usage(args) -> None:
    from store_service.usage import usage_histogram, usage_summary
    ckpt, model, tok, meta, table = _load(args.checkpoint)
    u = table.usage()
    edges, counts = usage_histogram(u, bins=args.bins)
    summary = usage_summary(u)
    if args.json:
        _print({"summary": summary, "histogram": {"edges": edges, "counts": counts}})
        return
    for k in ("rows", "rows_used", "fraction_used", "kl_from_uniform", "top_share", "frozen", "ablated"):
        print(f"{k:>16}: {summary[k]}")
    top = max(counts) if counts else 1
    print("rows by log10(1 + reads):")
    for lo, c in zip(edges, counts):
        print(f"  {lo:5.2f} {c:7d} {'#' * int(50 * c / top)}")


# -- reorder ----------------------------------------------------------------------------------

def cmd_reorder(args) -> None:
    from model_worker import reorder as R
    from model_worker.checkpoint import derive_checkpoint
    from model_worker.data import build_corpus
    ckpt, model, tok, meta, table = _load(args.checkpoint)
    texts = build_corpus(meta["train_config"]["corpus"]).train_texts[: args.docs]
    trace = R.usage_trace(model, tok, texts, per="token")
    info = table.info()
    kl = model.knowledge_layers()[0]
    plan = R.cooccurrence_order(trace, info.num_rows, kl.n)
    version = R.publish_reordered(table.store_root, info.version, plan)
    R.permute_model(model, plan)
    out = Path(args.out) if args.out else ckpt.parent / f"reordered_v{version:08d}"
    derive_checkpoint(ckpt, out, meta, version, model=model, reordered_from=info.version)
    page_rows = max(1, 4096 // (info.d_v * 4))
    held = build_corpus(meta["train_config"]["corpus"]).heldout_texts[: args.docs]
    ev = R.usage_trace(model, tok, held, per="token")  # already in the new order
    inv_old = [plan.old_of_new[t] for t in ev]
    _print({"published_version": version, "checkpoint": str(out),
            "locality_per_token_before": R.locality([x.sort().values for x in inv_old], page_rows),
            "locality_per_token_after": R.locality(ev, page_rows)})


def register(sub) -> None:
    """Add the verbs to kstore's subparsers."""
    def ck(p):
        p.add_argument("--checkpoint", required=True, help="a checkpoint step directory (or a run directory)")

    p = sub.add_parser("learn", help="teach new facts: new rows only (default), published as a new store version")
    ck(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--facts", help="a text file: 'prompt<TAB>answer[<TAB>subject]' per line (or plain "
                                     "sentences); the subject (default: the whole prompt) is what the fact's rows "
                                     "are gated on")
    src.add_argument("--corpus-new", action="store_true", help="the corpus' held-out new facts (default)")
    p.add_argument("--corpus", default=None, help="corpus preset (default: the checkpoint's)")
    p.add_argument("--method", default="new_rows", choices=["new_rows", "sparse_memory", "full_finetune", "lora"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=None, help="default: LearnConfig's (16)")
    p.add_argument("--lr", type=float, default=None,
                   help="lr: rows (new_rows, sparse_memory) or model weights (full_finetune, lora); default per method")
    p.add_argument("--key-lr", type=float, default=None, help="new_rows: flat-key lr (default: LearnConfig's, 0)")
    p.add_argument("--key-margin", type=float, default=None,
                   help="new_rows: key score above the best product row (default: LearnConfig's, 3)")
    p.add_argument("--top-t", type=int, default=None, help="sparse_memory: rows unfrozen per batch (default: 64)")
    p.add_argument("--no-gate", action="store_true",
                   help="new_rows: do not gate a fact's answer rows on its subject's rows (selection bias only)")
    p.add_argument("--no-detectors", action="store_true",
                   help="new_rows: no detectors (a subject's facts then open together wherever the subject is "
                        "named, and their answer rows compete by the query at the answer alone)")
    p.add_argument("--background-batches", type=int, default=128,
                   help="pretraining batches (of 16 x 64 tokens) used to calibrate new keys: old text they "
                        "miss may select the new rows, so cover the pretraining text where you can")
    p.add_argument("--measure", type=int, default=0, metavar="N",
                   help="with --corpus-new: recall of new facts and of N old facts before and after")
    p.add_argument("--out", default=None, help="checkpoint directory to write (default: beside the input)")
    p.set_defaults(fn=cmd_learn)

    p = sub.add_parser("explain", help="rows each token read, their weights, and the contexts that use them most")
    ck(p)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--top-rows", type=int, default=4)
    p.add_argument("--answer-only", action="store_true", help="only the generated tokens")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-contexts", action="store_true", help="do not collect per-row contexts if none are saved")
    p.add_argument("--recollect", action="store_true", help="collect per-row contexts again")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("ablate", help="disable rows (admin API) and compare answers")
    ck(p)
    p.add_argument("--rows", required=True, help="ids, e.g. 3,7,10:20")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--publish", action="store_true", help="publish the ablated table as a new version")
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("usage", help="row usage: fraction used, KL from uniform, top share, histogram")
    ck(p)
    p.add_argument("--bins", type=int, default=12)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_usage)

    p = sub.add_parser("reorder", help="lay rows out by co-use; publish as a new version (ids remapped)")
    ck(p)
    p.add_argument("--docs", type=int, default=2000, help="training texts whose reads define co-use")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_reorder)
