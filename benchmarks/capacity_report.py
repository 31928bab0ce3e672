"""Capacity results: provenance, merging results across calls, the headline, the plot and
the GPU plan (benchmarks/capacity.py runs the training; this module only reads results)."""
from __future__ import annotations

import math
import os
import statistics
import subprocess
from pathlib import Path

from benchmarks.common import cpu_model, provenance as common_provenance
from model_worker.data.bios.lists import information_bits_per_person

ROOT = Path(__file__).resolve().parents[1]
TARGET_BITS_RATIO, TARGET_TOKENS_RATIO = 4.0, 0.7


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_string(device: str) -> str:
    import torch
    host = f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (model and table on the GPU, TF32 matmuls); {host}"
    return host


def provenance(device: str) -> dict:
    """benchmarks.common.provenance, with the device described in full."""
    return common_provenance(device=device_string(device))


def _mean_se(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    return {"mean": m, "se": statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None, "n": len(xs),
            "values": xs}


def per_point(runs: dict[str, dict]) -> dict:
    """{people: {model: {bits, bits_per_active_param, ...: mean/se over seeds}}} of finished runs."""
    points: dict[int, dict[str, list[dict]]] = {}
    for r in runs.values():
        if r["spec"].get("remote"):
            continue
        points.setdefault(r["spec"]["people"], {}).setdefault(r["spec"]["model"], []).append(r)
    out: dict = {}
    for n in sorted(points):
        out[n] = {}
        for model, rs in sorted(points[n].items()):
            params = rs[0]["progress"]["params"]
            out[n][model] = {
                "seeds": sorted(r["spec"]["seed"] for r in rs),
                "bits": _mean_se([r["bits"] for r in rs]),
                "bits_per_active_param": _mean_se([r["bits"] / r["progress"]["params"]["active"] for r in rs]),
                "bits_per_total_param": _mean_se([r["bits"] / r["progress"]["params"]["total"] for r in rs]),
                "fraction_stored": _mean_se([r["fraction_stored"] for r in rs]),
                "name_bits": _mean_se([r["name_bits"] for r in rs]),
                "recall": {k: _mean_se([r["recall"][k]["recall"] for r in rs]) for k in rs[0]["recall"]},
                "active_params": params["active"], "total_params": params["total"],
                "tokens_trained": statistics.mean(r["progress"]["tokens"] for r in rs),
                "tokens_per_s_in_run": _mean_se([r["progress"]["timed_tokens"] / r["progress"]["timed_s"]
                                                 for r in rs if r["progress"]["timed_s"] > 0] or [0.0]),
            }
    return out


def headline(points: dict, models: list[str], seeds: list[int], exposures: int, tput: dict | None,
             flops: dict | None = None) -> dict:
    """At the largest population every model finished with every seed (else with any seed).
    flops: capacity.py's flops_per_token (at the largest population), for the compute figures."""
    full = [n for n in points if all(m in points[n] and len(points[n][m]["seeds"]) >= len(seeds) for m in models)]
    some = [n for n in points if all(m in points[n] for m in models)]
    if not (full or some):
        return {"people": None, "note": "no population has a finished run of every model yet"}
    n = max(full or some)
    p = points[n]

    def by(field: str, sub: str = "mean") -> dict:
        return {m: p[m][field][sub] for m in models}

    tokens = {m: (tput or {}).get(m, {}).get("tokens_per_s") for m in models}
    out = {"people": n, "exposures": exposures,
           "bits_per_active_param": by("bits_per_active_param"), "bits_per_total_param": by("bits_per_total_param"),
           "tokens_per_s": tokens, "recall_heldout_template": {m: p[m]["recall"]["held_out"]["mean"] for m in models},
           "recall_trained_template": {m: p[m]["recall"]["trained"]["mean"] for m in models},
           "seeds": sorted(set.intersection(*(set(p[m]["seeds"]) for m in models))),
           "bits": by("bits"), "bits_se_over_seeds": by("bits", "se"),
           "information_bits": n * sum(information_bits_per_person().values()),
           "active_params": {m: p[m]["active_params"] for m in models},
           "total_params": {m: p[m]["total_params"] for m in models}}
    if flops and flops["people"] == n and all(m in flops["by_model"] for m in models):
        out.update(_compute(p, models, tokens, {m: flops["by_model"][m]["train"] for m in models}))
    dense_kinds = [m for m in ("dense", "dense_gelu") if m in models]
    if "knowledge" in models and dense_kinds:
        bpa = out["bits_per_active_param"]
        # the baseline at its best: the dense variant that stores the most bits per parameter here
        base = max(dense_kinds, key=lambda m: bpa[m])
        out["dense_baseline"] = base
        out["knowledge_over_dense_bits_per_active_param"] = bpa["knowledge"] / bpa[base] if bpa[base] > 0 else None
        if "moe" in models:
            out["knowledge_over_moe_bits_per_active_param"] = bpa["knowledge"] / bpa["moe"] if bpa["moe"] > 0 else None
        if tokens.get("knowledge") and tokens.get(base):
            out["knowledge_over_dense_tokens_per_s"] = tokens["knowledge"] / tokens[base]
            spread = _ratio_spread(tput["knowledge"], tput[base])
            if spread:
                out["knowledge_over_dense_tokens_per_s_spread"] = spread
        if tokens.get("knowledge") and tokens.get("moe"):
            # what the knowledge layers cost on their own: the knowledge model is the MoE plus them
            out["knowledge_over_moe_tokens_per_s"] = tokens["knowledge"] / tokens["moe"]
        if "knowledge_dense" in models:   # the store without the MoE: does the MoE earn its step time here?
            kd = "knowledge_dense"
            out["knowledge_dense_over_dense_bits_per_active_param"] = bpa[kd] / bpa[base] if bpa[base] > 0 else None
            if tokens.get(kd) and tokens.get(base):
                out["knowledge_dense_over_dense_tokens_per_s"] = tokens[kd] / tokens[base]
        if "bits_per_train_pflop" in out:
            bpf = out["bits_per_train_pflop"]
            out["knowledge_over_dense_bits_per_train_flop"] = bpf["knowledge"] / bpf[base] if bpf[base] > 0 else None
        r_kd, r_t = out.get("knowledge_over_dense_bits_per_active_param"), out.get("knowledge_over_dense_tokens_per_s")
        out["target"] = {"knowledge_over_dense_bits_per_active_param_at_least": TARGET_BITS_RATIO,
                         "knowledge_over_dense_tokens_per_s_at_least": TARGET_TOKENS_RATIO,
                         "met": bool(r_kd is not None and r_kd >= TARGET_BITS_RATIO and r_t is not None
                                     and r_t >= TARGET_TOKENS_RATIO and bpa["knowledge"] > bpa.get("moe", 0))}
    if not full:
        out["note"] = "not every seed finished at this population"
    return out


def _ratio_spread(a: dict, b: dict) -> dict | None:
    """The ratio a / b of two throughput records by their steps (capacity_train.throughput's
    step_tokens_per_s): of the medians, and from a's lower quartile over b's upper to a's
    upper over b's lower (None for records made before steps were timed)."""
    sa, sb = a.get("step_tokens_per_s"), b.get("step_tokens_per_s")
    if not (sa and sb):
        return None
    return {"of_medians": sa["median"] / sb["median"],
            "quartile_range": [sa["quartiles"][0] / sb["quartiles"][1], sa["quartiles"][1] / sb["quartiles"][0]]}


def _compute(p: dict, models: list[str], tokens_per_s: dict, train_flops: dict) -> dict:
    """Bits per training compute and the compute rate reached: train_flops[m] is model m's
    matmul FLOPs per training token (capacity_flops.py); every run of a population trains
    on the same tokens (p[m]["tokens_trained"])."""
    return {"train_flops_per_token": train_flops,
            "bits_per_train_pflop": {m: p[m]["bits"]["mean"] / (train_flops[m] * p[m]["tokens_trained"]) * 1e15
                                     for m in models},
            # matmul FLOP/s while training alone (tokens/s x FLOPs per token): how far from the card's peak
            "achieved_train_tflop_per_s": {m: tokens_per_s[m] * train_flops[m] / 1e12 if tokens_per_s.get(m) else None
                                           for m in models}}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = {int(n): v for n, v in results["points"].items()}
    models = sorted({m for v in points.values() for m in v})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ns = sorted(points)
    bits_per_person = sum(information_bits_per_person().values())
    axes[0].plot(ns, [n * bits_per_person for n in ns], "k--", lw=1, label="information in the population")
    for i, m in enumerate(models):
        xs = [n for n in ns if m in points[n]]
        label = f"{m} ({points[xs[0]][m]['active_params'] / 1e6:.2f}M active)"
        for ax, field, sub in ((axes[0], "bits", None), (axes[1], "bits_per_active_param", None),
                               (axes[2], "recall", "held_out")):
            stat = [points[n][m][field][sub] if sub else points[n][m][field] for n in xs]
            ax.plot(xs, [s["mean"] for s in stat], marker="o", color=f"C{i}", label=label)
            for n, s in zip(xs, stat):
                ax.scatter([n] * len(s["values"]), s["values"], color=f"C{i}", s=8, alpha=0.4)
    axes[0].set(xscale="log", yscale="log", xlabel="people N", ylabel="bits stored (lower bound)",
                title="Knowledge stored vs population")
    axes[1].set(xscale="log", xlabel="people N", ylabel="bits per active parameter", title="Bits per active parameter")
    axes[2].set(xscale="log", xlabel="people N", ylabel="exact-match recall", title="Recall, held-out templates")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    device = results["device"].split("; CPU:")[0]   # on a GPU the card says where it ran; the host's CPU is in the JSON
    fig.suptitle(f"{device[:90]} | {results['config']['exposures']} exposures, seeds {results['config']['seeds']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gpu_plan(tput: dict, people: list[int], tokens_per_person: float, exposures: int, seeds: int,
             concurrency_gain: float, lending_s: float = 1800.0) -> dict:
    """Minutes each (N, model) run takes alone at the measured tokens/s, the minutes a
    population's runs take when run together (tokens/s scaled by `concurrency_gain`, the
    measured or assumed aggregate over one run's), and whether they fit one lending."""
    plan: dict = {}
    for n in people:
        tokens = n * tokens_per_person * exposures
        alone = {m: tokens / t["tokens_per_s"] / 60 for m, t in tput.items() if t.get("tokens_per_s")}
        together = sum(alone.values()) * seeds / concurrency_gain
        plan[n] = {"tokens_per_run": tokens, "minutes_alone": alone, "minutes_all_runs_together": together,
                   "fits_one_lending": together * 60 <= lending_s * 0.8 and max(alone.values()) * 60 <= lending_s * 0.8}
    return plan
