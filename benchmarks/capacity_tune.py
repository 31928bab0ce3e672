"""Learning-rate tuning for the capacity benchmark, on a population no reported run sees.

Every model (dense, MoE, MoE + knowledge) trains at every lr of one grid, the same grid and
so the same tuning budget for each, on the tune seed's population: the seed draws the
people, the token stream's renderings and the initialisation, so seed 100 shares nothing
with the reported seeds 0 and 1 but the lists the attributes come from. Each run is
scored with capacity.py's measure (bits stored, capacity_measure.py); a model's chosen lr is
the one that stores the most bits (ties: the smaller lr). capacity.py takes the choice with
`--lr-from benchmarks/results/capacity_tune.json` and refuses it when the tuning trained
with other settings than its runs (anything but lr, seed and N).

Only the transformer's lr (AdamW, cosine to 10%) is tuned: the table's row lr keeps the
preset's value (0.05, the quality benchmark's), so the knowledge model gets no extra knob.
A choice at the edge of the grid is flagged in the headline (`at_grid_edge`): the grid
should then be widened before the choice is trusted.

    python benchmarks/capacity_tune.py --device cuda --people 10000 --budget-s 540   # repeat to continue
    python benchmarks/capacity_tune.py --size tiny --people 200 --exposures 20 --budget-s 1800   # CPU check

Writes benchmarks/results/capacity_tune.json (+ .png: bits stored against lr per model).
Runs checkpoint and resume like capacity.py's (runs/capacity_tune/<size>).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import capacity  # noqa: E402
from benchmarks import capacity_report as report  # noqa: E402
from benchmarks.capacity_measure import BITS_FORMULA  # noqa: E402
from benchmarks.capacity_train import RunSpec  # noqa: E402
from benchmarks.common import check_reuse  # noqa: E402
from model_worker.data.bios.lists import information_bits_per_person  # noqa: E402

# What a tuning shares with the runs that use its choice (capacity.lr_by_model checks them).
SETTINGS = ("size", "exposures", "vocab", "seq_len", "batch_size", "warmup_steps", "value_lr", "rows_per_person",
            "moe_grouped_bf16", "table_optimizer")
TUNE_SEED = 100


def run_key(spec: RunSpec) -> str:
    return f"{spec.name}_lr{spec.lr:g}"


def grid_specs(args) -> dict[str, RunSpec]:
    out = {}
    for lr in args.lr_grid:
        for s in capacity.specs(argparse.Namespace(**{**vars(args), "people": [args.people], "seeds": [args.seed],
                                                      "lr": lr, "lr_by_model": {}, "remote_runs": []})):
            out[run_key(s)] = s
    return out


def choose(runs: dict[str, dict], models: list[str], grid: list[float]) -> dict:
    """{chosen_lr, bits: {model: {lr: bits}}, at_grid_edge, complete} from finished runs."""
    bits: dict[str, dict[float, float]] = {m: {} for m in models}
    for r in runs.values():
        bits[r["spec"]["model"]][r["spec"]["lr"]] = r["bits"]
    chosen, edge = {}, {}
    for m in models:
        if not bits[m]:
            continue
        best = max(sorted(bits[m]), key=lambda lr: bits[m][lr])     # max keeps the first (smaller lr) of ties
        chosen[m] = best
        edge[m] = best in (min(grid), max(grid))
    complete = all(len(bits[m]) == len(grid) for m in models)
    return {"chosen_lr": chosen, "bits": {m: {f"{lr:g}": b for lr, b in sorted(bits[m].items())} for m in models},
            "at_grid_edge": edge, "complete": complete}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = result["headline"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (m, by_lr) in enumerate(h["bits"].items()):
        if by_lr:
            lrs = sorted(by_lr, key=float)
            ax.plot([float(x) for x in lrs], [by_lr[x] for x in lrs], "o-", color=f"C{i}", label=m)
    ax.axhline(h["information_bits"], color="k", ls="--", lw=1, label="information")
    ax.set(xscale="log", xlabel="lr", ylabel="bits stored", title=f"lr tuning, N = {h['people']}, seed {h['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(result["device"].split("; CPU:")[0][:90], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    capacity.add_training_arguments(ap, "runs/capacity_tune/<size>")
    ap.add_argument("--people", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=TUNE_SEED, help="the tuning population (not a reported seed)")
    ap.add_argument("--lr-grid", type=lambda s: [float(x) for x in s.split(",") if x], default=[1e-3, 2e-3, 4e-3, 8e-3])
    ap.add_argument("--reuse", nargs="*", default=[], help="capacity_tune JSONs of earlier calls to merge")
    ap.add_argument("--out", default=str(capacity.RESULTS / "capacity_tune.json"))
    args = ap.parse_args(argv)
    capacity.apply_size_defaults(args)
    if args.seed in range(10):
        raise SystemExit(f"--seed {args.seed}: seeds 0-9 are the reported ones; tune on another population")
    start = time.time()
    runs_dir = Path(args.runs_dir or report.ROOT / "runs" / "capacity_tune" / args.size)
    wanted = grid_specs(args)
    taken, reused = {}, []
    for f in args.reuse:
        old = json.loads(Path(f).read_text())
        marked = check_reuse(old, args.force_reuse, f"tuning runs of {f}")
        names = [k for k, r in old.get("runs", {}).items()
                 if k in wanted and RunSpec(**r["spec"]).training_settings() == wanted[k].training_settings()]
        taken.update({k: {**old["runs"][k], "reused_from": f} for k in names if k not in taken})
        reused.append({"from": f, "runs": names, **marked})
    todo = {k: s for k, s in wanted.items() if k not in taken}
    taken.update(capacity.train_runs(args, todo, runs_dir, start + args.budget_s, start))
    picked = choose(taken, args.models, args.lr_grid)
    info = sum(information_bits_per_person().values()) * args.people
    result = {"device": report.device_string(args.device), "provenance": report.provenance(args.device),
              "config": vars(args), "settings": {k: getattr(args, k) for k in SETTINGS}, "bits_formula": BITS_FORMULA,
              "reused": reused, "runs": dict(sorted(taken.items())),
              "unfinished": sorted(k for k in wanted if k not in taken),
              "headline": {"people": args.people, "seed": args.seed, "lr_grid": args.lr_grid,
                           "information_bits": info, **picked}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if any(picked["bits"].values()):
        plot(result, out.with_suffix(".png"))
    print(json.dumps(result["headline"], indent=2))
    print(f"unfinished runs: {len(result['unfinished'])}; {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
