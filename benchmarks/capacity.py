"""Knowledge capacity (issue 22): how many bits of knowledge a model holds per active
parameter, dense vs MoE vs MoE + knowledge store, on synthetic biographies.

The corpus is bioS (Allen-Zhu and Li 2024, "Physics of Language Models, Part 3.3",
arXiv 2404.05405; model_worker/data/bios/): N people, each with a birth date, birth city,
university, major, employer and the employer's city drawn uniformly from fixed lists
(46.6 bits a person), each biography rendered afresh at every exposure through one of 6
training templates per attribute (2 more held out) in a random sentence order. Every
model of a (N, seed) sees the same token stream for the same number of exposures.

The measure (capacity_measure.py; `bits_formula` in the JSON):

    bits = sum_g max(0, sum_{a in g} N * (log2|V_a| - mean_i L_ia / ln 2))

L_ia is the model's summed cross-entropy in nats over person i's value of attribute a
and the "." that closes it, teacher-forced on a biography with training templates; the
groups g are birth date, birth city, university, major, and employer with its city. It
is the attribute part N log2(|V_a| / e^{p_a}) of the paper's bit-complexity lower bound
(its name term, N log2((N0 - N) / e^{p_1}), is reported as `name_bits`). Beside it:
exact-match recall on trained templates, held-out templates and questions.

Models (model_worker/config.py, cap-*): dense, MoE (16 experts, 2 active + 1 shared)
and MoE + knowledge (a knowledge layer beside the FFN of block 2 over a product-key
table of n_sub^2 >= rows_per_person * N rows), matched at ~1.05M active parameters;
`--size tiny` uses the cap-tiny-* presets (~170k) for a CPU check at small N; `--size gpu4m`
the cap4m-* presets (~4M, d_model 256), for tokens/s against model size.

Runs checkpoint and resume: each command trains every unfinished run (in `--jobs`
processes) until `--budget-s` is nearly spent, checkpoints into `--runs-dir`, and writes
the JSON from the runs finished so far. Call it again to continue; `--reuse FILE ...`
merges finished runs from earlier calls (other machines or lendings) when they were
trained with the same settings; every run keeps the provenance (commit, command,
machine, date) of the command that finished it. `--throughput` times each model alone
(and the knowledge model with its table served by 2 shard processes over gRPC);
`--remote-runs` trains the knowledge runs with the served table too.

    python benchmarks/capacity.py --size tiny --people 500,2000 --exposures 20 --budget-s 3600   # CPU check
    python benchmarks/capacity.py --device cuda --people 10000,30000,100000 --budget-s 540        # GPU, repeat
    python benchmarks/capacity.py --device cuda --throughput-only --people 100000 --budget-s 300
    python benchmarks/capacity.py --plan benchmarks/results/capacity.json

Writes benchmarks/results/capacity.json (headline, points per N, every run) and
capacity.png (bits stored, bits per active parameter and held-out recall against N).
The GPU plan and what was measured: benchmarks/CAPACITY_NOTES.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import capacity_flops, capacity_report as report  # noqa: E402
from benchmarks.capacity_measure import BITS_FORMULA, measure  # noqa: E402
from benchmarks.capacity_train import (LARGE_TABLE_OPTIMIZER, RunSpec, advance, n_sub_for,  # noqa: E402
                                       resolve_table_optimizer, throughput)
from benchmarks.common import check_reuse  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# dense_gelu: the dense baseline with GPT-2's MLP instead of SwiGLU (same parameters): the paper
# finds gated MLPs store less at 100 exposures, so the headline compares with the better dense.
PRESETS = {"gpu": {"dense": "cap-dense", "dense_gelu": "cap-dense-gelu", "moe": "cap-moe",
                   "knowledge": "cap-knowledge", "knowledge_dense": "cap-knowledge-dense"},
           # ~4M active (the upper size): for tokens/s against model size
           "gpu4m": {"dense": "cap4m-dense", "dense_gelu": "cap4m-dense-gelu", "moe": "cap4m-moe",
                     "knowledge": "cap4m-knowledge", "knowledge_dense": "cap4m-knowledge-dense"},
           "tiny": {"dense": "cap-tiny-dense", "dense_gelu": "cap-tiny-dense-gelu", "moe": "cap-tiny-moe",
                    "knowledge": "cap-tiny-knowledge", "knowledge_dense": "cap-tiny-knowledge-dense"}}
SIZE_DEFAULTS = {"gpu": dict(vocab=2048, seq_len=256, batch_size=128, lr=2e-3, warmup_steps=100),
                 "gpu4m": dict(vocab=2048, seq_len=256, batch_size=128, lr=2e-3, warmup_steps=100),
                 "tiny": dict(vocab=1024, seq_len=128, batch_size=16, lr=3e-3, warmup_steps=20)}
MIN_START_S = 90.0      # a run is not started with less than this left before the deadline


def specs(args, remote: bool = False) -> list[RunSpec]:
    out = []
    for n in args.people:
        for seed in args.seeds:
            for m in args.models:
                if remote and m not in args.remote_runs:
                    continue
                out.append(RunSpec(model=m, preset=PRESETS[args.size][m], people=n, seed=seed, exposures=args.exposures,
                                   seq_len=args.seq_len, batch_size=args.batch_size,
                                   lr=getattr(args, "lr_by_model", {}).get(m, args.lr),
                                   warmup_steps=args.warmup_steps, value_lr=args.value_lr,
                                   rows_per_person=args.rows_per_person, table_optimizer=args.table_optimizer,
                                   vocab=args.vocab, remote=remote, device=args.device, threads=args.threads,
                                   moe_grouped_bf16=args.moe_grouped_bf16))
    return out


def _measure(model, data, spec, *, bits_people: int, recall_people: int, batch_size: int) -> dict:
    out = measure(model, data, spec, bits_people=bits_people, recall_people=recall_people, batch_size=batch_size)
    out["provenance"] = report.provenance(spec.device)
    out["table_optimizer_used"] = resolve_table_optimizer(spec.table_optimizer) if model.knowledge_layers() else None
    out["n_sub"] = n_sub_for(spec) if model.knowledge_layers() else None
    return out


def _advance_job(job) -> str:
    spec_dict, run_dir, deadline, reserve_s, eval_kw = job
    spec = RunSpec(**spec_dict)
    if deadline - time.time() < MIN_START_S + reserve_s:
        return f"{spec.name}: not started ({deadline - time.time():.0f} s left)"
    advance(spec, Path(run_dir), deadline, measure_fn=functools.partial(_measure, **eval_kw),
            log=lambda s: print(s, flush=True), reserve_s=reserve_s)
    return spec.name


def _throughput_job(job) -> dict:
    spec_dict, work_dir, steps = job
    return throughput(RunSpec(**spec_dict), Path(work_dir), steps, log=lambda s: print(s, flush=True))


def reuse(args, files: list[str], wanted: list[RunSpec]) -> tuple[dict, list[dict]]:
    """Finished runs of earlier calls' JSONs whose training settings equal a wanted spec's."""
    want = {s.name: s.training_settings() for s in wanted}
    taken, info = {}, []
    for f in files:
        old = json.loads(Path(f).read_text())
        marked = check_reuse(old, getattr(args, "force_reuse", False), f"runs of {f}")
        names = []
        for name, r in old.get("runs", {}).items():
            if name in want and RunSpec(**{**r["spec"]}).training_settings() == want[name] and name not in taken:
                taken[name] = {**r, "reused_from": f}
                names.append(name)
        info.append({"from": f, "runs": names, "commit": old.get("provenance", {}).get("commit"), **marked})
        if old.get("throughput") and not getattr(args, "_tput_taken", None):
            args._tput_taken = {**old["throughput"], "from": f}
    return taken, info


INTS = lambda s: [int(x) for x in s.split(",") if x]    # noqa: E731
NAMES = lambda s: [x for x in s.split(",") if x]        # noqa: E731


def add_training_arguments(ap: argparse.ArgumentParser, runs_dir_default: str) -> None:
    """The options that say how runs train and are scored, and where (shared with capacity_tune.py)."""
    ap.add_argument("--force-reuse", action="store_true",
                    help="take --reuse runs even from another commit (marked as forced in the result)")
    ap.add_argument("--size", choices=sorted(PRESETS), default="gpu", help="presets: cap-* (gpu) or cap-tiny-*")
    ap.add_argument("--models", type=NAMES, default=["dense", "dense_gelu", "moe", "knowledge"])
    ap.add_argument("--exposures", type=int, default=100)
    for k, t in (("vocab", int), ("seq_len", int), ("batch_size", int), ("lr", float), ("warmup_steps", int)):
        ap.add_argument("--" + k.replace("_", "-"), type=t, default=None, help="default: by --size")
    ap.add_argument("--value-lr", type=float, default=None, help="the table's row lr (default: the preset's)")
    ap.add_argument("--rows-per-person", type=float, default=4.0)
    ap.add_argument("--moe-grouped-bf16", action="store_true",
                    help="MoE models' routed experts as bf16 grouped GEMMs (sm90; other numerics than the dense model's)")
    ap.add_argument("--table-optimizer", default=LARGE_TABLE_OPTIMIZER,
                    help="the table's row optimizer (a store optimizer kind; an unknown name is refused)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run process")
    ap.add_argument("--jobs", type=int, default=0, help="runs trained at once (0: 1 on cuda, 2 on cpu)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="this command's wall seconds")
    ap.add_argument("--reserve-s", type=float, default=45.0,
                    help="seconds before the deadline at which runs stop to checkpoint (and measure, when done)")
    ap.add_argument("--runs-dir", default=None, help=f"checkpoints (default {runs_dir_default})")
    ap.add_argument("--bits-people", type=int, default=20_000, help="people scored for bits (a sample above)")
    ap.add_argument("--recall-people", type=int, default=1_000)
    ap.add_argument("--eval-batch-size", type=int, default=256)


def apply_size_defaults(args) -> None:
    for k, v in SIZE_DEFAULTS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def train_runs(args, runs: dict[str, RunSpec], runs_dir: Path, deadline: float, start: float) -> dict[str, dict]:
    """Train every run of `runs` ({key: spec}, each in runs_dir/key) until done or the deadline
    nears, `--jobs` at a time; -> {key: result} of those finished (now or by an earlier call)."""
    eval_kw = dict(bits_people=args.bits_people, recall_people=args.recall_people, batch_size=args.eval_batch_size)
    jobs = [(dataclasses.asdict(s), str(runs_dir / key), deadline, args.reserve_s, eval_kw) for key, s in runs.items()
            if not (runs_dir / key / "result.json").exists()]
    # One at a time on a GPU: processes sharing a card take turns on it rather than overlap,
    # so 6 runs at once took as long as one after another (l2 at fac56a5: 561 s of training
    # alone, ~10.5 min together), and one after another finishes each run sooner, so a
    # lending that ends early has banked whole runs rather than parts of all of them.
    n_jobs = args.jobs or (1 if args.device.startswith("cuda") else 2)
    if jobs:
        with multiprocessing.get_context("spawn").Pool(max(1, min(n_jobs, len(jobs)))) as pool:
            for name in pool.imap_unordered(_advance_job, jobs, chunksize=1):
                print(f"[{time.time() - start:.0f}s] {name}", flush=True)
    return {key: json.loads((runs_dir / key / "result.json").read_text()) for key in runs
            if (runs_dir / key / "result.json").exists()}


def lr_by_model(path: str | None, args) -> dict[str, float]:
    """The lr each model trains at: capacity_tune.py's choice (--lr-from), else --lr for all.
    The tuning must have trained the way these runs will (all settings but lr, seed and N)."""
    if not path:
        return {}
    tune = json.loads(Path(path).read_text())
    ref = tune["settings"]
    mine = {k: getattr(args, k) for k in ref}
    if mine != ref:
        diff = {k: (ref[k], mine[k]) for k in ref if ref[k] != mine[k]}
        raise SystemExit(f"--lr-from {path}: tuned with other settings (tuned, here): {diff}")
    chosen = tune["headline"]["chosen_lr"]
    missing = [m for m in args.models if m not in chosen and m not in args.untuned]
    if missing:
        raise SystemExit(f"--lr-from {path}: no lr was tuned for {missing} (name them in --untuned to train at --lr)")
    return {m: chosen[m] if m in chosen else args.lr for m in args.models}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(ap, "runs/capacity/<size>")
    ap.add_argument("--people", type=INTS, default=[10_000, 30_000, 100_000])
    ap.add_argument("--seeds", type=INTS, default=[0, 1])
    ap.add_argument("--lr-from", default=None, metavar="TUNE_JSON",
                    help="each model's lr from capacity_tune.py's result (tuned on a population not reported)")
    ap.add_argument("--untuned", type=NAMES, default=[],
                    help="with --lr-from: models left at --lr on purpose (the baselines may get more tuning, never less)")
    ap.add_argument("--remote-runs", type=NAMES, default=[], help="models whose runs also train over 2 served shards")
    ap.add_argument("--throughput", action="store_true", help="also time each model alone (after the runs)")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--tput-steps", type=int, default=50)
    ap.add_argument("--reuse", nargs="*", default=[], help="capacity JSONs of earlier calls to merge")
    ap.add_argument("--plan", default=None, metavar="FILE", help="print the GPU plan from FILE's throughput, train nothing")
    ap.add_argument("--concurrency-gain", type=float, default=1.0,
                    help="for --plan: aggregate tokens/s of a population's runs together over one run's alone "
                         "(~1.0 measured on the H100: runs take turns on the card)")
    ap.add_argument("--out", default=str(RESULTS / "capacity.json"))
    args = ap.parse_args(argv)
    apply_size_defaults(args)
    args.lr_by_model = lr_by_model(args.lr_from, args)
    if args.plan:
        old = json.loads(Path(args.plan).read_text())
        tokens_per_person = old.get("tokens_per_person") or 66.0
        print(json.dumps(report.gpu_plan(old["throughput"]["local"], args.people, tokens_per_person, args.exposures,
                                         len(args.seeds), args.concurrency_gain), indent=2))
        return
    start = time.time()
    deadline = start + args.budget_s
    runs_dir = Path(args.runs_dir or report.ROOT / "runs" / "capacity" / args.size)
    wanted = specs(args) + specs(args, remote=True)
    results: dict = {"device": report.device_string(args.device), "provenance": report.provenance(args.device),
                     "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                     "bits_formula": BITS_FORMULA, "table_optimizer_requested": args.table_optimizer,
                     "table_optimizer_used": resolve_table_optimizer(args.table_optimizer)}
    taken, results["reused"] = reuse(args, args.reuse, wanted)
    ctx = multiprocessing.get_context("spawn")
    if not args.throughput_only:
        pending = [s for s in wanted if s.name not in taken]
        pending.sort(key=lambda s: (s.people, s.seed, s.remote, s.model))   # the small populations first
        taken.update(train_runs(args, {s.name: s for s in pending}, runs_dir, deadline, start))
    tput = getattr(args, "_tput_taken", None)
    if args.throughput or args.throughput_only:
        n = max(args.people)
        tput_specs = [s for s in specs(args) + specs(args, remote=True) if s.people == n and s.seed == args.seeds[0]]
        if "knowledge" in args.models and "knowledge" not in args.remote_runs:
            tput_specs += [s for s in specs(argparse.Namespace(**{**vars(args), "remote_runs": ["knowledge"]}), remote=True)
                           if s.people == n and s.seed == args.seeds[0]]
        measured = {}
        for s in tput_specs:     # one at a time, each alone on the device
            with ctx.Pool(1) as pool:
                measured[s.name] = pool.apply(_throughput_job, ((dataclasses.asdict(s), str(runs_dir / f"tput_{s.name}"),
                                                                 args.tput_steps),))
        tput = {"people": n, "local": {s.model: measured[s.name] for s in tput_specs if not s.remote},
                "remote": {s.model: measured[s.name] for s in tput_specs if s.remote}, "device": results["device"],
                "provenance": results["provenance"]}
        for m, r in tput["remote"].items():
            if m in tput["local"]:
                r["remote_over_local"] = r["tokens_per_s"] / tput["local"][m]["tokens_per_s"]
    results["throughput"] = tput
    devices = sorted({r["provenance"]["device"] for r in taken.values() if r.get("provenance")})
    if devices and all("reused_from" in r for r in taken.values()):
        results["device"] = " | ".join(devices)        # a merge: the runs' own devices
    results["runs"] = dict(sorted(taken.items()))
    results["points"] = report.per_point(taken)
    results["tokens_per_person"] = _tokens_per_person(taken)
    n = max((int(k) for k in results["points"]), default=None)
    results["flops_per_token"] = _flops_at(taken, n, args.models)
    results["headline"] = report.headline(results["points"], args.models, args.seeds, args.exposures,
                                          (tput or {}).get("local"), results["flops_per_token"])
    results["headline"]["lr"] = _lr_at(taken, results["headline"].get("people"), args)
    results["remote_runs"] = _remote_vs_local(taken)
    results["unfinished"] = [s.name for s in wanted if s.name not in taken]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if results["points"]:
        report.plot(results, out.with_suffix(".png"))
    print(json.dumps(results["headline"], indent=2))
    print(f"unfinished runs: {len(results['unfinished'])}; {time.time() - start:.0f} s", flush=True)


def _lr_at(runs: dict, people: int | None, args) -> dict:
    """Each model's lr at the headline's population, read from its runs, and where it came from."""
    lrs = {}
    for r in runs.values():
        s = r["spec"]
        if s["people"] == people and not s.get("remote"):
            lrs.setdefault(s["model"], set()).add(s["lr"])
    tuned = {m: bool(args.lr_from) and m not in args.untuned for m in args.models}
    return {"by_model": {m: sorted(v) for m, v in sorted(lrs.items())}, "tuned": tuned, "tune_file": args.lr_from}


def _flops_at(runs: dict, people: int | None, models: list[str]) -> dict | None:
    """Training FLOPs per token (benchmarks/capacity_flops.py) of each model as its runs at
    `people` trained it (one run's spec each: the FLOPs depend on neither seed nor lr)."""
    one = {}
    for r in runs.values():
        s = r["spec"]
        if s["people"] == people and s["model"] in models and not s.get("remote"):
            one.setdefault(s["model"], RunSpec(**s))
    if not one:
        return None
    return {"people": people, "how": capacity_flops.__doc__.split("\n\n")[0],
            "by_model": {m: capacity_flops.flops_per_token(spec) for m, spec in sorted(one.items())}}


def _tokens_per_person(runs: dict) -> float | None:
    """Training tokens per person and exposure, from finished runs (for the plan)."""
    rs = [r for r in runs.values() if r.get("progress", {}).get("tokens")]
    if not rs:
        return None
    return sum(r["progress"]["tokens"] / (r["spec"]["people"] * r["spec"]["exposures"]) for r in rs) / len(rs)


def _remote_vs_local(runs: dict) -> dict:
    """Each run trained over served shards beside its in-process twin: bits, recall, tokens/s."""
    out = {}
    for name, r in runs.items():
        if not r["spec"].get("remote"):
            continue
        twin = runs.get(name.removesuffix("_remote"))
        p = r["progress"]
        row = {"bits": r["bits"], "recall_held_out": r["recall"]["held_out"]["recall"],
               "tokens_per_s": p["timed_tokens"] / p["timed_s"] if p["timed_s"] else None}
        if twin is not None:
            tp = twin["progress"]
            row.update(local_bits=twin["bits"], local_recall_held_out=twin["recall"]["held_out"]["recall"],
                       local_tokens_per_s=tp["timed_tokens"] / tp["timed_s"] if tp["timed_s"] else None)
        out[name] = row
    return out


if __name__ == "__main__":
    main()
