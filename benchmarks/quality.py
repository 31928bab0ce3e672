"""Quality at matched active parameters: dense vs MoE vs MoE + knowledge, the same
training tokens and data, on this CPU, under issue 24's protocol. Also (unless
--no-throughput): training throughput with the table served by 2 gRPC shard processes on
loopback vs the in-process table.

    nice -n 10 python benchmarks/quality.py --no-throughput    # ~70 min on 2 shared CPU cores (15 runs)
    python benchmarks/quality.py --size tiny --corpus tiny --knowledge '{}' --steps 5 --no-throughput   # a smoke run

Protocol (benchmarks/quality_protocol.py): the trained facts' held-out-phrasing prompts
(and held-out loss texts) are split by fact, with --split-seed, into a tuning half and a
test half. Every family (dense, MoE, MoE + knowledge) has the same number of variants,
fixed in advance: its preset and one other way of spending the same active parameters
(quality_protocol.VARIANTS). Each variant trains once per --tune-seeds seed and is
scored on the tuning half only; the family's variant with the best tuning-half recall is
chosen; the chosen variant then trains once per --seeds seed (disjoint from the tuning
seeds) and is scored on the test half only. The JSON holds the tuning (trials per family,
what was tried, each trial's tuning metrics, the winner), every run, and a headline of
test-half figures: per family mean / median / min / max / seed s.e. over the reported
seeds, and knowledge minus the best baseline (the baseline family with the highest
test-half mean, i.e. the hardest comparator) paired by seed and with a bootstrap
interval over test facts.

The regime (the defaults): the "medium" corpus (~640 facts: 60 countries, 150 cities;
one paraphrase template per relation held out), 1500 steps of 32 x 64 tokens (~25 passes
over the training text, enough for these models to memorise a good share of the facts;
with fewer passes every model sits at the majority-answer baseline and the comparison
is noise). Active parameters are matched (the codebooks count as active, the rows a
token does not read do not). The rows' lr is the preset's (0.05, rowwise): not tuned
here (benchmarks/optimizer_tradeoff.py tunes it per row optimizer).

On a GPU, `--device cuda --jobs 12 --time-budget 150` puts every run's model and table
on the GPU and sets --steps so that the slowest run fits the budget; `--reuse FILE` (the
result or its .partial.json, written after every run) keeps the finished runs of an
earlier call at the same commit and settings and trains only the missing ones.
`--throughput-only` measures remote vs in-process training throughput alone;
`--summarize FILE` rebuilds a saved JSON's headline and PNG without training.

Writes benchmarks/results/quality.json and quality.png. What it measured:
benchmarks/QUALITY_NOTES.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (ByteCounter, CallTimer, check_reuse, cpu_model, provenance,  # noqa: E402
                               server_handling_seconds, write_result)
from benchmarks.quality_protocol import (VARIANTS, Variant, choose, evaluate_half, headline,  # noqa: E402
                                         merge_overrides, split_examples)
from model_worker.config import configs  # noqa: E402
from model_worker.data import ByteTokenizer, build_corpus  # noqa: E402
from store_service.testing import loopback_table  # noqa: E402
from model_worker.train import TrainConfig, create_table, model_config, table_config, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The knowledge model of the throughput comparison and of benchmarks/optimizer_tradeoff.py.
RUNS = {"knowledge": "small-knowledge-2l"}


def device_string(device: str = "cpu") -> str:
    cpu = cpu_model()
    host = f"CPU: {cpu}, {os.cpu_count()} cores visible (shared with other jobs), torch {torch.__version__}"
    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(0)} (models and tables on the GPU); {host}"
    return host


def model_overrides(args, model: str) -> dict:
    """--knowledge JSON: fields of the knowledge layer's config to change; --knowledge-model
    JSON: fields of the knowledge model's own config (e.g. a narrower d_ff that keeps the
    active parameters matched when the knowledge layer grows). Knowledge preset only."""
    if configs[model].get("knowledge") is None:
        return {}
    out = json.loads(args.knowledge_model) if args.knowledge_model else {}
    if args.knowledge:
        out["knowledge"] = {**configs[model]["knowledge"], **json.loads(args.knowledge)}
    return out


def base_config(args, model: str, out_dir: str, seed: int = 0, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(model=model, model_overrides=model_overrides(args, model), steps=args.steps,
                                 seq_len=args.seq_len, batch_size=args.batch_size,
                                 lr=args.lr, warmup=args.warmup, corpus=args.corpus,
                                 eval_every=max(1, args.steps // args.evals), eval_recall_n=0, eval_loss_batches=0,
                                 value_lr=args.value_lr, out_dir=out_dir, progress=args.progress, seed=seed,
                                 device=args.device, eval_batch_size=args.eval_batch_size),
                          **kw})


TPUT_WARM_STEPS = 10
TABLE_OPS = ("search", "fetch", "readout", "readout_backward", "accumulate_key_grads",
             "accumulate_value_grads", "end_step")


def wire_variant(name: str) -> dict:
    """How readouts travel, by name: "{compact|grid}-{fp32|bf16}[-c<rows>]": each shard gets
    only its entries (compact, the default) or the whole [T, k] grid with the others' ids as
    -1; the partial readouts and their gradients in fp32 (exact) or bf16; calls split into
    pieces of <rows> rows, all in flight at once. The default is "compact-fp32"."""
    parts = name.split("-")
    ok = len(parts) in (2, 3) and parts[0] in ("compact", "grid") and parts[1] in ("fp32", "bf16") and \
        (len(parts) == 2 or (parts[2].startswith("c") and parts[2][1:].isdigit()))
    if not ok:
        raise ValueError(f"wire variant {name!r}: expected {{compact|grid}}-{{fp32|bf16}}[-c<rows>]")
    return {"compact_readout": parts[0] == "compact",
            "readout_wire_dtype": {"fp32": "float32", "bf16": "bfloat16"}[parts[1]],
            "readout_chunk_rows": int(parts[2][1:]) if len(parts) == 3 else 0}



def _tput_run(args, work: Path, name: str, remote: bool, timed: bool,
              wire: str = "compact-fp32", readout: str = "pushdown") -> tuple[dict, list[float]]:
    """One throughput run. `timed`: also bill each table call's wall time (with a device
    sync around it, which perturbs the step time: that is why the untimed runs are separate),
    and for a remote table each RPC's client-side and server-side seconds.
    `readout`: the knowledge layers' readout mode (pushdown, fetch or auto)."""
    cfg = base_config(args, RUNS["knowledge"], str(work / f"tput_{name}"), seed=args.seeds[0],
                      steps=TPUT_WARM_STEPS + args.tput_steps, eval_every=0, num_shards=2)
    knowledge = cfg.model_overrides.get("knowledge") or configs[RUNS["knowledge"]]["knowledge"]
    cfg.model_overrides = {**cfg.model_overrides, "knowledge": {**knowledge, "readout": readout}}
    marks: list[float] = []
    counter = ByteCounter()
    timers: list[CallTimer] = []
    servers: list = []
    scrapes: list[list[dict]] = []
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None

    def hook(done: int) -> None:
        marks.append(time.perf_counter())
        counting = done >= TPUT_WARM_STEPS   # count the timed steps only
        counter.enabled = counting
        for t in timers:
            t.enabled = counting
        if timed and servers and done in (TPUT_WARM_STEPS, TPUT_WARM_STEPS + args.tput_steps):
            scrapes.append([server_handling_seconds(p.metrics_port) for p in servers])

    def attach_timer(table) -> None:
        if timed:
            timers.append(CallTimer(table, [m for m in TABLE_OPS if hasattr(table, m)], sync=sync))

    mcfg = model_config(cfg, ByteTokenizer().vocab_size)
    if not remote:
        table = create_table(mcfg, cfg)   # what train() would make; ours, to time its calls
        attach_timer(table)
        r = train(cfg, table=table, step_hook=hook)
    else:
        tcfg = table_config(mcfg, cfg)
        with loopback_table(tcfg, str(work / f"tput_{name}" / "store"), interceptors=[counter],
                            server_device=args.server_device, servers=servers if timed else None,
                            torch_threads=args.server_threads, **wire_variant(wire)) as table:
            attach_timer(table)
            r = train(cfg, table=table, step_hook=hook)
    n = args.tput_steps
    steady = (marks[-1] - marks[TPUT_WARM_STEPS - 1]) / n
    out = {"tokens_per_s": cfg.batch_size * cfg.seq_len / steady, "seconds_per_step": steady,
           "whole_run_tokens_per_s": r["tokens_per_s"], "final_loss": r["final_loss"]}
    if counter.bytes:
        # Serialized request + response bytes per training step, by RPC: where the wire time goes.
        out["wire_bytes_per_step"] = {m: b / n for m, b in counter.bytes.items()}
        out["calls_per_step"] = {m: c / n for m, c in counter.calls.items()}
    if timed:
        t = timers[0]
        out["table_call_seconds_per_step"] = {m: s / n for m, s in t.seconds.items() if t.calls[m]}
        if counter.seconds:
            # Summed over the shards' parallel calls: a step waits for about half of it.
            out["rpc_client_seconds_per_step"] = {m: s / n for m, s in counter.seconds.items()}
        if len(scrapes) == 2:
            handled: dict[str, float] = {}
            for before, after in zip(*scrapes):
                for m, (calls, secs) in after.items():
                    if calls > before.get(m, (0, 0.0))[0]:
                        handled[m] = handled.get(m, 0.0) + (secs - before.get(m, (0, 0.0))[1]) / n
            out["rpc_server_seconds_per_step"] = handled
    return out, r["losses"]


def _max_rel_diff(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def throughput(args, work: Path) -> dict:
    """For each readout mode in --tput-readouts, `throughput_one_mode`; the modes side by
    side. The headline, `remote_over_fastest_local`, is the fastest remote mode's median
    tokens/s over the fastest in-process mode's median tokens/s, all measured in this call
    (a mode cannot look good by being slow in-process); `remote_over_local` stays the
    chosen mode's ratio against its own in-process run."""
    modes = [m for m in args.tput_readouts.split(",") if m]
    by_mode = {m: throughput_one_mode(args, work, m) for m in modes}
    best = max(modes, key=lambda m: by_mode[m]["remote_tokens_per_s_median"])
    fastest_local = max(modes, key=lambda m: by_mode[m]["local_tokens_per_s_median"])
    out = {**by_mode[best], "readout": best, "fastest_local_readout": fastest_local,
           "remote_over_fastest_local": by_mode[best]["remote_tokens_per_s_median"]
           / by_mode[fastest_local]["local_tokens_per_s_median"]}
    if len(modes) > 1:
        out["by_readout"] = {m: {"local_tokens_per_s": r["local"]["tokens_per_s"],
                                 "remote_tokens_per_s": r["remote"]["tokens_per_s"],
                                 "remote_over_local": r["remote_over_local"],
                                 "max_rel_loss_diff": r["max_rel_loss_diff"],
                                 **({"wire_variants": {v: w["remote_over_local"] for v, w in r["wire_variants"].items()}}
                                    if "wire_variants" in r else {})} for m, r in by_mode.items()}
        out["runs_by_readout"] = {m: r for m, r in by_mode.items() if m != best}
    return out


def throughput_one_mode(args, work: Path, readout: str) -> dict:
    """The same knowledge-model run (no eval) with the in-process table and with 2 loopback
    shard servers. tokens/s is timed over the `--tput-steps` after TPUT_WARM_STEPS first
    steps (kernel compilation, in the worker and in each fresh server process, and
    allocator warm-up are not throughput); `whole_run_tokens_per_s` counts every step.
    With --tput-repeats N the pair runs N times, one after the other, and the ratio is
    the median of the N pairs' (each pair's is kept): on a shared machine one pair can be off
    by 0.1-0.2. A second pair of runs bills the time to each table call and RPC (`breakdown`)."""
    out, losses, ratios = {}, {}, []
    for rep in range(max(1, args.tput_repeats)):
        pair = {}
        for name in ("local", "remote"):
            pair[name], loss = _tput_run(args, work, f"{readout}_{name}_r{rep}", remote=name == "remote",
                                         timed=False, readout=readout)
            if rep == 0:
                out[name], losses[name] = pair[name], loss
        ratios.append(pair["remote"]["tokens_per_s"] / pair["local"]["tokens_per_s"])
        if rep > 0:
            out.setdefault("repeats", []).append({n: pair[n]["tokens_per_s"] for n in pair})
    out["remote_over_local"] = statistics.median(ratios)
    for name in ("local", "remote"):
        runs = [out[name]["tokens_per_s"]] + [r[name] for r in out.get("repeats", [])]
        out[f"{name}_tokens_per_s_median"] = statistics.median(runs)
        out[f"{name}_tokens_per_s_min_max"] = [min(runs), max(runs)]
    if len(ratios) > 1:
        out["remote_over_local_per_repeat"] = ratios
    out["remote_over_local_whole_run"] = out["remote"]["whole_run_tokens_per_s"] / out["local"]["whole_run_tokens_per_s"]
    out["timed_steps"] = args.tput_steps
    out["server_device"] = args.server_device or args.device
    out["remote_extra_seconds_per_step"] = out["remote"]["seconds_per_step"] - out["local"]["seconds_per_step"]
    out["max_rel_loss_diff"] = _max_rel_diff(losses["remote"], losses["local"])
    out["wire"] = "compact-fp32"
    others = [v for v in args.wire_variants.split(",") if v and v != "compact-fp32"]
    if others:
        # The same run with readouts travelling otherwise, against the same local run.
        out["wire_variants"] = {}
        for v in others:
            run, vl = _tput_run(args, work, f"{readout}_remote_{v}", remote=True, timed=False, wire=v,
                                readout=readout)
            run["remote_over_local"] = run["tokens_per_s"] / out["local"]["tokens_per_s"]
            run["max_rel_loss_diff"] = _max_rel_diff(vl, losses["local"])
            out["wire_variants"][v] = run
    if not args.no_breakdown:
        out["breakdown"] = {name: _tput_run(args, work, f"{readout}_{name}_timed", remote=name == "remote",
                                            timed=True, readout=readout)[0]
                            for name in ("local", "remote")}
    return out


def variant_config(args, v: Variant, out_dir: str, seed: int, **kw) -> TrainConfig:
    """A variant's TrainConfig: the shared settings, the preset, the --knowledge overrides
    (knowledge presets), the variant's own overrides; no evaluation during training (the
    evaluation after it sees one half of the prompts only)."""
    cfg = base_config(args, v.preset, out_dir, seed=seed, eval_every=0, **kw)
    cfg.model_overrides = merge_overrides(cfg.model_overrides, v.overrides)
    return cfg


def _timing_run(job) -> float:
    """Seconds per training step of one run's config, measured with the other runs
    training beside it (the contention the real runs will see): `--time-budget`."""
    args, phase, v, seed, work = job
    torch.set_num_threads(args.threads)
    warm, timed = 10, args.calibrate_steps
    cfg = variant_config(args, v, str(Path(work) / f"calib_{v.name}_seed{seed}"), seed, steps=warm + timed)
    marks = []
    train(cfg, step_hook=lambda done: marks.append(time.perf_counter()))
    return (marks[-1] - marks[warm - 1]) / timed


def _job(job) -> dict:
    """Train one variant with one seed and evaluate it on one half: a tuning run (tuning
    seed) on the tuning half only, a reported run (reported seed) on the test half only."""
    args, phase, v, seed, work = job
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = variant_config(args, v, str(Path(work) / f"{phase}_{v.name}_seed{seed}"), seed)
    r = train(cfg)
    t1 = time.time()
    half = split_examples(build_corpus(cfg.corpus), args.split_seed)[phase]
    ev = evaluate_half(r["model"], half, cfg.seq_len, cfg.batch_size, args.eval_batch_size, seen=phase == "test")
    return {"phase": phase, "variant": v.to_dict(), "seed": seed, "params": r["params"], "tokens": r["tokens"],
            "final_train_loss": r["final_loss"], "tokens_per_s": r["tokens_per_s"], **ev,
            "train_s": t1 - t0, "wall_s": time.time() - t0, "model_config": r["model"].cfg.to_dict()}


def job_key(phase: str, v: Variant, seed: int) -> str:
    return f"{phase}/{v.name}/{seed}"


# Settings that must match for an earlier call's run to stand beside this call's runs.
SAME_TRAINING = ("steps", "seq_len", "batch_size", "lr", "value_lr", "knowledge", "knowledge_model", "warmup",
                 "corpus", "device", "split_seed", "size")


def reuse_jobs(args, path: Path) -> tuple[dict, dict]:
    """The finished runs of an earlier call (its result or its .partial.json: a GPU lease
    that ended mid-benchmark) trained with the same settings, by job key; a run whose
    variant is defined otherwise now is left out (it is trained again). Refused when the
    earlier call ran at another commit, unless --force-reuse (then marked)."""
    old = json.loads(path.read_text())
    marked = check_reuse(old, getattr(args, "force_reuse", False), f"--reuse {path}")
    prev = dict(old["config"])
    if old.get("calibration"):                      # --time-budget chose the steps there
        prev["steps"] = old["calibration"]["steps"]
    diff = {k: (prev.get(k), getattr(args, k)) for k in SAME_TRAINING if prev.get(k) != getattr(args, k)}
    if diff:
        raise SystemExit(f"--reuse {path}: trained with other settings (earlier, now): {diff}")
    now = {v.name: v.to_dict() for vs in VARIANTS[args.size].values() for v in vs}
    taken = {k: r for k, r in old.get("jobs", {}).items() if now.get(r["variant"]["name"]) == r["variant"]}
    print(f"reusing {len(taken)} runs from {path}: {', '.join(taken)}", flush=True)
    return taken, {"from": str(path), "device": old.get("device"), "command": old.get("command"),
                   "runs": sorted(taken), **marked}


def split_summary(corpus, seed: int) -> dict:
    halves = split_examples(corpus, seed)
    test = halves["test"]
    index = {k: i for i, k in enumerate(test["facts"])}
    return {"split_seed": seed, "by": "fact (subject, relation): all phrasings of a fact on one side",
            "tune_facts": len(halves["tune"]["facts"]), "tune_prompts": len(halves["tune"]["eval"]),
            "test_facts": len(test["facts"]), "test_prompts": len(test["eval"]),
            "test_fact_of_prompt": [index[(e.subject, e.relation)] for e in test["eval"]]}


def tuning_record(families: dict, jobs: dict, tune_seeds: list) -> dict:
    """Per family: trials, what was tried with its tuning-half metrics, and the winner,
    chosen from those metrics alone (`choose`)."""
    out = {}
    for fam, vs in families.items():
        runs = {v.name: [jobs[job_key("tune", v, s)] for s in tune_seeds] for v in vs}
        tried = [{"variant": v.name, "what": v.what, "preset": v.preset, "overrides": v.overrides,
                  "active_params": runs[v.name][0]["params"]["active"],
                  "tune_recall_heldout": statistics.fmean(r["recall_heldout"] for r in runs[v.name]),
                  "tune_heldout_loss": statistics.fmean(r["heldout_loss"] for r in runs[v.name])} for v in vs]
        metrics = {n: [{"recall_heldout": r["recall_heldout"], "heldout_loss": r["heldout_loss"]} for r in rs]
                   for n, rs in runs.items()}
        out[fam] = {"trials": len(vs) * len(tune_seeds), "tried": tried, "winner": choose(metrics),
                    "rule": " ".join(choose.__doc__.split(". `")[0].split())}
    return out


def summarize(path: Path, out: Path) -> dict:
    """Rebuild the headline and the PNG of a saved quality JSON (no training)."""
    results = json.loads(path.read_text())
    results["headline"] = build_headline(results)
    results["runs_provenance"] = results.get("runs_provenance") or results.get("provenance")
    results["provenance"] = provenance(device=results.get("provenance", {}).get("device", "cpu"))
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    return results["headline"]


def build_headline(results: dict) -> dict:
    c = results["config"]
    jobs, tuning = results["jobs"], results["tuning"]
    test = {f: [jobs[f"test/{t['winner']}/{s}"] for s in c["seeds"]] for f, t in tuning.items()}
    h = headline(tuning, test, results["split"], c["seeds"], c["tune_seeds"], c["corpus"], c["steps"])
    h["remote_over_fastest_local_tokens_per_s"] = results.get("throughput", {}).get("remote_over_fastest_local")
    return h


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, tuning = results["headline"], results["tuning"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (fam, t) in enumerate(h["test"].items()):
        runs = [results["jobs"][f"test/{t['variant']}/{s}"]["recall_heldout"] for s in h["seeds"]]
        r = t["recall_heldout"]
        a.bar(i, r["median"], color=f"C{i}", alpha=0.5)
        a.errorbar(i, r["median"], yerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]], color="k", capsize=4)
        a.plot([i] * len(runs), runs, "k.", alpha=0.6)
    a.set_xticks(range(len(h["test"])), [f"{f}\n{t['variant']}" for f, t in h["test"].items()], fontsize=8)
    a.set(ylabel="recall, held-out phrasings, test half",
          title=f"test half: median, min-max, each seed ({len(h['seeds'])} seeds)")
    names, vals, cols = [], [], []
    for i, (fam, t) in enumerate(tuning.items()):
        for tr in t["tried"]:
            names.append(tr["variant"] + (" *" if tr["variant"] == t["winner"] else ""))
            vals.append(tr["tune_recall_heldout"])
            cols.append(f"C{i}")
    b.bar(range(len(vals)), vals, color=cols)
    b.set_xticks(range(len(vals)), names, rotation=30, fontsize=8)
    b.set(ylabel="recall, held-out phrasings, tuning half",
          title=f"tuning trials (seeds {h['tuning_seeds']}); * chosen")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wire_variants(text: str) -> str:
    for v in text.split(","):
        if v:
            try:
                wire_variant(v)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--evals", type=int, default=1, help="(unused by the quality runs: they evaluate once, at the end)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--value-lr", type=float, default=None, help="the table's row lr (default: the preset's)")
    ap.add_argument("--knowledge", default='{"n_sub": 128}', help='JSON overrides of the knowledge layer, e.g. \'{"n_sub": 128}\'')
    ap.add_argument("--knowledge-model", default="",
                    help='JSON overrides of the knowledge model\'s config, e.g. \'{"d_ff": 144}\'')
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--corpus", default="medium")
    ap.add_argument("--size", default="small", choices=sorted(VARIANTS), help="the variant table (tiny: tests)")
    ap.add_argument("--families", default="dense,moe,knowledge", help="comma-separated families of the variant table")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="the reported seeds (test half)")
    ap.add_argument("--tune-seeds", type=_ints, default=[100], help="the tuning seeds (tuning half); disjoint from --seeds")
    ap.add_argument("--split-seed", type=int, default=24, help="the seed that splits the facts into tuning and test halves")
    ap.add_argument("--tput-steps", type=int, default=40)
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--wire-variants", default="", type=_wire_variants,
                    help="comma-separated readout wire formats to also time remotely, "
                         "{compact|grid}-{fp32|bf16}[-c<rows>], e.g. grid-fp32,compact-bf16-c8192 "
                         "(the headline ratio is compact-fp32's, which is exact)")
    ap.add_argument("--tput-readouts", default="pushdown,fetch",
                    help="comma-separated readout modes to time (pushdown, fetch, auto), each as a local + "
                         "remote pair; the headline ratio is the mode with the fastest remote run")
    ap.add_argument("--tput-repeats", type=int, default=1,
                    help="run each local + remote pair this many times; the ratio is the pairs' median")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of each throughput shard server")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the throughput's second pair of runs, which bill the step time to table calls and RPCs")
    ap.add_argument("--throughput-only", action="store_true",
                    help="train no quality run: only the remote vs in-process throughput, written to --out")
    ap.add_argument("--server-device", default=None,
                    help="where the throughput run's 2 shard servers keep their rows (default: --device); "
                         "e.g. cpu with --device cuda: a GPU worker over host-memory shards")
    ap.add_argument("--jobs", type=int, default=2, help="quality runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: every run's model and table on the GPU")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds of training per run: time each config's steps with all runs in flight, "
                         "then set --steps to what the slowest fits (every model still gets the same tokens)")
    ap.add_argument("--calibrate-steps", type=int, default=40)
    ap.add_argument("--eval-batch-size", type=int, default=64,
                    help="prompts per generation call in recall; on a GPU use ~1024 (decoding is launch-bound: "
                         "the H200 runs spent most of their wall time decoding groups of <= 64 prompts)")
    ap.add_argument("--reuse", default=None,
                    help="a (partial) quality JSON of an earlier call with the same training settings: its "
                         "finished runs are kept, only the missing ones are trained")
    ap.add_argument("--force-reuse", action="store_true",
                    help="take --reuse runs even from another commit (marked as forced in the result)")
    ap.add_argument("--summarize", default=None, metavar="FILE",
                    help="train nothing: rebuild the headline and PNG of a saved quality JSON into --out")
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = ap.parse_args(argv)
    if set(args.seeds) & set(args.tune_seeds):
        ap.error(f"--tune-seeds {args.tune_seeds} and --seeds {args.seeds} must be disjoint")
    unknown = set(args.families.split(",")) - set(VARIANTS[args.size])
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}; known: {sorted(VARIANTS[args.size])}")
    return args


def run_protocol(args, work: Path, results: dict, jobs: dict) -> None:
    """Tuning runs first; as soon as a family's tuning runs are done its winner is chosen
    (tuning-half metrics only) and its reported runs are queued. Each finished run is
    written to <out>.partial.json at once (a run cut off keeps them: --reuse it)."""
    families = {f: VARIANTS[args.size][f] for f in args.families.split(",")}
    ctx = multiprocessing.get_context("spawn")
    partial = Path(args.out).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    tuning: dict = {}
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        tune_jobs = [(args, "tune", v, s, str(work)) for vs in families.values() for v in vs for s in args.tune_seeds]
        if args.time_budget:
            per_step = dict(zip([j[2].name for j in tune_jobs], pool.map(_timing_run, tune_jobs)))
            slowest = max(per_step.values())
            args.steps = max(100, int(args.time_budget / slowest) // 100 * 100)
            results["calibration"] = {"seconds_per_step": per_step, "steps": args.steps}
            print(f"calibration: slowest {slowest * 1e3:.1f} ms/step -> {args.steps} steps per run", flush=True)
        pending = {pool.submit(_job, j): j for j in tune_jobs if job_key(*j[1:4]) not in jobs}

        def queue_tested(fam: str) -> None:
            tuning[fam] = tuning_record({fam: families[fam]}, jobs, args.tune_seeds)[fam]
            win = next(v for v in families[fam] if v.name == tuning[fam]["winner"])
            print(f"{fam}: chose {win.name} on the tuning half", flush=True)
            for s in args.seeds:
                j = (args, "test", win, s, str(work))
                if job_key("test", win, s) not in jobs:
                    pending[pool.submit(_job, j)] = j

        def tuned(fam: str) -> bool:
            return all(job_key("tune", v, s) in jobs for v in families[fam] for s in args.tune_seeds)

        for fam in families:                          # families whose tuning runs were all reused
            if tuned(fam):
                queue_tested(fam)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.pop(fut)
                r = fut.result()
                jobs[f"{r['phase']}/{r['variant']['name']}/{r['seed']}"] = r
                partial.write_text(json.dumps({**results, "tuning": tuning, "jobs": jobs}, indent=1))
                print(f"{r['phase']:4s} seed {r['seed']:3d} {r['variant']['name']:13s} active {r['params']['active']:>9,d} "
                      f"recall {r['recall_heldout']:.3f} heldout_loss {r['heldout_loss']:.4f} "
                      f"tok/s {r['tokens_per_s']:.0f} wall {r['wall_s']:.0f}s", flush=True)
                fam = r["variant"]["family"]
                if r["phase"] == "tune" and fam not in tuning and tuned(fam):
                    queue_tested(fam)
    results["tuning"] = {f: tuning[f] for f in families}


def main() -> None:
    args = parse_args()
    if args.summarize:
        print(json.dumps(summarize(Path(args.summarize), Path(args.out)), indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="kstore_quality_"))
    results: dict = {"provenance": provenance(device=args.device), "device": f"{device_string(args.device)}; {args.jobs} runs in parallel, "
                               f"{args.threads} torch thread(s) each",
                     "command": " ".join(["python"] + sys.argv), "config": vars(args)}
    if args.throughput_only:
        torch.set_num_threads(args.threads)
        results.update(device=device_string(args.device), throughput=throughput(args, work))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps(results["throughput"], indent=2))
        return
    results["split"] = split_summary(build_corpus(args.corpus), args.split_seed)
    results["variants"] = {f: [v.to_dict() for v in VARIANTS[args.size][f]] for f in args.families.split(",")}
    jobs: dict = {}
    if args.reuse:
        jobs, results["reused"] = reuse_jobs(args, Path(args.reuse))
    run_protocol(args, work, results, jobs)
    results["jobs"] = jobs
    if not args.no_throughput:
        torch.set_num_threads(args.threads)
        results["throughput"] = throughput(args, work)
        print("throughput", json.dumps(results["throughput"]), flush=True)
    results["headline"] = build_headline(results)
    write_result(args.out, results, device=args.device, plot=lambda r, p: plot(r, Path(p)))
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
