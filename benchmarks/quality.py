"""Quality at matched active parameters: dense vs MoE vs MoE + knowledge (and a
dense model with twice the knowledge model's active parameters), the same
training tokens and data, on this CPU. Also: training throughput with the table
served by 2 gRPC shard processes on loopback vs the in-process table.

    python benchmarks/quality.py                      # ~30 min on 2 CPU cores (4 models x 3 seeds)
    python benchmarks/quality.py --seeds 0,1,2,3,4,5 --reuse benchmarks/results/quality.json   # 3 more seeds
    python benchmarks/quality.py --seeds 0 --steps 300 --no-throughput   # a quick look

The regime (the defaults): the "medium" corpus (~640 facts: 60 countries, 150
cities; one paraphrase template per relation held out), 1500 steps of 32 x 64
tokens (~25 passes over the training text, enough for these models to memorise
a good share of the facts; with fewer passes every model sits at the
majority-answer baseline and the comparison is noise). The knowledge model is
the small-knowledge-2l preset (knowledge layers beside the FFNs of blocks 1 and 2,
both over one 16k-row table, n_sub 128; chosen over the one-layer small-knowledge
on seeds 100-102, which the reported seeds do not include) at matched active
parameters (the codebooks count as active, the rows it does not read do not).
Recall is exact match over *all* held-out-phrasing prompts of the trained
facts; the headline is the mean over `--seeds`, each seed is reported beside it,
with recall on a seen phrasing and per relation in each run's `final_recall`.

On a GPU, `--device cuda --jobs 12 --time-budget 150` puts every run's model and
table on the GPU and sets --steps so that the slowest run fits the budget;
`--reuse FILE` keeps the finished runs of an earlier call trained with the same
settings (a lease ends mid-benchmark) and trains only the missing ones.
`--throughput-only` measures remote vs in-process training throughput alone;
`--summarize FILE` rebuilds a saved JSON's headline and PNG without training.

Writes benchmarks/results/quality.json and quality.png (recall vs training steps).
What it measured on an H200: benchmarks/QUALITY_NOTES.md.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import ByteCounter, CallTimer, check_reuse, cpu_model, provenance, server_handling_seconds  # noqa: E402

from model_worker import evaluate  # noqa: E402
from model_worker.config import configs  # noqa: E402
from model_worker.data import ByteTokenizer, build_corpus  # noqa: E402
from model_worker.generate import generate_fn  # noqa: E402
from store_service.testing import loopback_table  # noqa: E402
from model_worker.train import TrainConfig, create_table, model_config, table_config, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"dense": "small-dense", "dense_2x": "small-dense-2x", "moe": "small-moe", "knowledge": "small-knowledge-2l"}


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


@torch.no_grad()
def final_detail(model, corpus, batch_size: int = 64) -> dict:
    """The trained model's recall per relation on held-out phrasings, and on a seen phrasing."""
    model.eval()
    fn = generate_fn(model, ByteTokenizer())
    out = {}
    with model.reading(readout="fetch"):
        for name, examples in (("heldout", corpus.eval), ("seen", corpus.eval_seen)):
            r = evaluate.recall_on_examples(fn, examples, batch_size=batch_size)
            out[name] = {"recall": r["recall"], "n": r["n"],
                         "by_type": {t: round(v["recall"], 4) for t, v in r["by_type"].items()}}
    return out


def _timing_run(job) -> float:
    """Seconds per training step of one run's config, measured with the other runs
    training beside it (the contention the real runs will see): `--time-budget`."""
    args, key, seed, work = job
    torch.set_num_threads(args.threads)
    warm, timed = 10, args.calibrate_steps
    cfg = base_config(args, RUNS[key], str(Path(work) / f"calib_{key}_seed{seed}"), seed=seed,
                      steps=warm + timed, eval_every=0)
    marks = []
    train(cfg, step_hook=lambda done: marks.append(time.perf_counter()))
    return (marks[-1] - marks[warm - 1]) / timed


def _quality_run(job) -> dict:
    args, key, seed, work = job
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = base_config(args, RUNS[key], str(Path(work) / f"{key}_seed{seed}"), seed=seed)
    r = train(cfg)
    detail = final_detail(r["model"], build_corpus(cfg.corpus), args.eval_batch_size)
    return {"key": key, "seed": seed, "preset": RUNS[key], "params": r["params"], "evals": r["evals"], "final_train_loss": r["final_loss"],
            "final_recall": detail, "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"],
            "wall_s": time.time() - t0, "model_config": r["model"].cfg.to_dict()}


# Settings that must match for an earlier call's run to stand beside this call's runs.
SAME_TRAINING = ("steps", "seq_len", "batch_size", "lr", "value_lr", "knowledge", "knowledge_model", "warmup",
                 "corpus", "device")
ADDED_LATER = {"knowledge_model": ""}   # what an option meant in files written before it existed


def reuse_runs(args, path: Path, by_seed: dict, keys: list[str]) -> dict:
    """Take the finished runs of an earlier call (e.g. a GPU lease that ended mid-benchmark)
    into `by_seed`, after checking that they were trained with the same settings."""
    old = json.loads(path.read_text())
    marked = check_reuse(old, getattr(args, "force_reuse", False), f"--reuse {path}")   # code version, not only settings
    prev = old["config"]
    if old.get("calibration"):                      # --time-budget chose the steps there
        prev = {**prev, "steps": old["calibration"]["steps"]}
    prev = {**ADDED_LATER, **prev}
    diff = {k: (prev.get(k), getattr(args, k)) for k in SAME_TRAINING if prev.get(k) != getattr(args, k)}
    if diff:
        raise SystemExit(f"--reuse {path}: trained with other settings (earlier, now): {diff}")
    taken = []
    for seed, runs in old["runs_by_seed"].items():
        for key, r in runs.items():
            if r.get("preset", RUNS.get(key)) != RUNS.get(key):   # that model has changed since
                continue
            if int(seed) in by_seed and key in keys:
                by_seed[int(seed)][key] = r
                taken.append(f"{key}_seed{seed}")
    print(f"reusing {len(taken)} runs from {path}: {', '.join(taken)}", flush=True)
    info = {"from": str(path), "device": old.get("device"), "command": old.get("command"), "runs": taken, **marked}
    if old.get("throughput"):
        info["throughput"] = old["throughput"]
    return info


def _mean_and_se(xs: list[float]) -> dict:
    """Mean and its standard error over seeds (se is None for one seed)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": m, "se": None}
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return {"mean": m, "se": (var / len(xs)) ** 0.5}


def headline(results: dict, keys: list[str], seeds: list, corpus: str) -> dict:
    """The summary a reader looks for first, from the runs of every seed. The per-seed
    spread and the paired (same seed) differences say whether a gap is more than noise."""
    by_seed = {s: results["runs_by_seed"][s] for s in seeds}
    runs = results["runs"]

    def final(s, k, metric="recall_heldout"):
        return by_seed[s][k]["evals"][-1][metric]

    recall = {k: _mean_and_se([final(s, k) for s in seeds]) for k in keys}
    out = {
        "recall_heldout": {k: recall[k]["mean"] for k in keys},
        "recall_heldout_se": {k: recall[k]["se"] for k in keys},
        "recall_heldout_per_seed": {s: {k: final(s, k) for k in keys} for s in seeds},
        "recall_seen_phrasing": {k: sum(by_seed[s][k]["final_recall"]["seen"]["recall"] for s in seeds)
                                 / len(seeds) for k in keys},
        "heldout_loss": {k: _mean_and_se([final(s, k, "heldout_loss") for s in seeds])["mean"] for k in keys},
        "seeds": list(seeds),
        "corpus": corpus,
        "active_params": {k: runs[k]["params"]["active"] for k in runs},
        "total_params": {k: runs[k]["params"]["total"] for k in runs},
        "remote_over_local_tokens_per_s": results.get("throughput", {}).get("remote_over_local"),
        "remote_over_fastest_local_tokens_per_s": results.get("throughput", {}).get("remote_over_fastest_local"),
        "training_tokens": {k: runs[k]["tokens"] for k in runs},
    }
    if "knowledge" in keys:
        others = [k for k in keys if k != "knowledge"]
        paired = {k: _mean_and_se([final(s, "knowledge") - final(s, k) for s in seeds]) for k in others}
        out["knowledge_recall_minus"] = {k: paired[k]["mean"] for k in others}
        out["knowledge_recall_minus_se"] = {k: paired[k]["se"] for k in others}
        out["knowledge_wins_per_seed"] = {s: all(final(s, "knowledge") > final(s, k) for k in others) for s in seeds}
    return out


def summarize(path: Path, out: Path) -> dict:
    """Rebuild the headline and the PNG of a saved quality JSON (no training): for runs
    gathered over several calls, or a headline that gained fields since."""
    results = json.loads(path.read_text())
    keys = list(results["runs"])
    seeds = list(results["runs_by_seed"])
    results["headline"] = headline(results, keys, seeds, results["config"]["corpus"])
    # the runs' own provenance stays with them; this call's (it only re-summarized) beside it
    results["runs_provenance"] = results.get("runs_provenance") or results.get("provenance")
    results["provenance"] = provenance(device=results.get("provenance", {}).get("device", "cpu"))
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    return results["headline"]


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by_seed = results["runs_by_seed"]
    for i, name in enumerate(results["runs"]):
        runs = [by_seed[s][name] for s in by_seed]
        label = f"{name} ({runs[0]['params']['active'] / 1e3:.0f}k active, {runs[0]['params']['total'] / 1e6:.2f}M total)"
        for ax, metric in ((a, "recall_heldout"), (b, "heldout_loss")):
            # Runs reused from another call may have been evaluated at other steps: the
            # mean is drawn at the steps every run shares (at least the last one).
            shared = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in runs)))
            at = [{e["step"]: e[metric] for e in r["evals"]} for r in runs]
            ax.plot(shared, [sum(c[t] for c in at) / len(at) for t in shared], marker="o", color=f"C{i}",
                    label=label, ls="none" if len(shared) == 1 else "-")
            if len(runs) > 1:
                for r in runs:
                    ax.plot([e["step"] for e in r["evals"]], [e[metric] for e in r["evals"]],
                            color=f"C{i}", alpha=0.3, lw=0.8, marker="." if len(r["evals"]) == 1 else None)
    a.set(xlabel="training step", ylabel="fact recall, held-out phrasings",
          title=f"Recall vs training steps (mean of {len(by_seed)} seed(s); thin: each seed)")
    b.set(xlabel="training step", ylabel="held-out loss (nats/token)", title="Held-out text loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _wire_variants(text: str) -> str:
    for v in text.split(","):
        if v:
            try:
                wire_variant(v)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--evals", type=int, default=3, help="evaluations per run")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--value-lr", type=float, default=None, help="the table's row lr (default: the preset's)")
    ap.add_argument("--knowledge", default='{"n_sub": 128}', help='JSON overrides of the knowledge layer, e.g. \'{"n_sub": 128}\'')
    ap.add_argument("--knowledge-model", default="",
                    help='JSON overrides of the knowledge model\'s config, e.g. \'{"d_ff": 144}\'')
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--corpus", default="medium")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                    help="comma-separated seeds; the headline is the mean over seeds, each seed is reported too")
    ap.add_argument("--tput-steps", type=int, default=40)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
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
                    help="a (partial) quality JSON from an earlier call with the same training settings: its "
                         "finished runs are kept, only the missing (model, seed) runs are trained")
    ap.add_argument("--force-reuse", action="store_true",
                    help="take --reuse runs even from another commit (marked as forced in the result)")
    ap.add_argument("--summarize", default=None, metavar="FILE",
                    help="train nothing: rebuild the headline and PNG of a saved quality JSON into --out")
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = ap.parse_args()
    if args.summarize:
        print(json.dumps(summarize(Path(args.summarize), Path(args.out)), indent=2))
        return

    work = Path(tempfile.mkdtemp(prefix="kstore_quality_"))
    results: dict = {"provenance": provenance(device=args.device), "device": f"{device_string(args.device)}; {args.jobs} runs in parallel, "
                               f"{args.threads} torch thread(s) each",
                     "command": " ".join(["python"] + sys.argv), "config": vars(args), "runs": {}}
    if args.throughput_only:
        torch.set_num_threads(args.threads)
        results.update(device=device_string(args.device), throughput=throughput(args, work))
        del results["runs"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps(results["throughput"], indent=2))
        return
    keys = args.runs.split(",")
    # Runs are independent: run them in `--jobs` processes of one torch thread each
    # (on a small shared CPU, one thread per process wastes far less time on contention).
    ctx = multiprocessing.get_context("spawn")
    by_seed: dict = {s: {} for s in args.seeds}
    if args.reuse:
        results["reused"] = reuse_runs(args, Path(args.reuse), by_seed, keys)
    with ctx.Pool(args.jobs) as pool:
        slow_first = sorted(keys, key=lambda k: ("knowledge", "dense_2x", "moe", "dense").index(k))
        jobs = [(args, key, seed, str(work)) for seed in args.seeds for key in slow_first if key not in by_seed[seed]]
        if args.time_budget:
            per_step = dict(zip([(k, s) for _, k, s, _ in jobs], pool.map(_timing_run, jobs, chunksize=1)))
            slowest = max(per_step.values())
            args.steps = max(100, int(args.time_budget / slowest) // 100 * 100)
            results["calibration"] = {"seconds_per_step": {f"{k}_seed{s}": t for (k, s), t in per_step.items()},
                                      "steps": args.steps}
            print(f"calibration: slowest {slowest * 1e3:.1f} ms/step -> {args.steps} steps per run", flush=True)
        partial = Path(args.out).with_suffix(".partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        for r in pool.imap_unordered(_quality_run, jobs, chunksize=1):
            key, seed = r["key"], r["seed"]
            by_seed[seed][key] = r
            partial.write_text(json.dumps({**results, "runs_by_seed": by_seed}, indent=1))
            last = r["evals"][-1]
            print(f"seed {seed} {key:10s} active {r['params']['active']:>9,d} total {r['params']['total']:>10,d} "
                  f"recall {last['recall_heldout']:.3f} (seen {r['final_recall']['seen']['recall']:.3f}) heldout_loss {last['heldout_loss']:.4f} "
                  f"tok/s {r['tokens_per_s']:.0f} wall {r['wall_s']:.0f}s", flush=True)
    if not args.no_throughput:
        torch.set_num_threads(args.threads)
        results["throughput"] = throughput(args, work)
        print("throughput", json.dumps(results["throughput"]), flush=True)
    elif results.get("reused", {}).get("throughput"):   # measured by the call whose runs we took
        results["throughput"] = {**results["reused"].pop("throughput"), "from": results["reused"]["from"]}

    results["runs_by_seed"] = {s: {k: by_seed[s][k] for k in keys} for s in args.seeds}
    results["runs"] = dict(results["runs_by_seed"][args.seeds[0]])  # the first seed's runs, in full
    results["headline"] = headline(results, keys, args.seeds, args.corpus)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["headline"], indent=2))


if __name__ == "__main__":
    main()
