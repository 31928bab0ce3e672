"""README's Benchmarks table, made from the results JSONs (issue 24): labels and figures
cannot drift from the runs, because nothing in the table is typed by hand.

    python -m benchmarks.readme_table            # print the table
    python -m benchmarks.readme_table --write    # put it in README.md between the markers
    python -m benchmarks.readme_table --check    # exit 1 if README's table differs

Each row reads one JSON: benchmarks/results/<file>, or, when only an archived run exists,
benchmarks/results/archive/<file>, and the row then says so. tests/benchmarks/
test_readme_table.py fails when README's table is not what this module makes.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- benchmarks-table:begin (python -m benchmarks.readme_table --write; do not edit by hand) -->"
END = "<!-- benchmarks-table:end -->"


def _p(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _by(d: dict, keys: list[str], fmt: Callable = _f) -> str:
    return " / ".join(fmt(d.get(k)) for k in keys)


# -- one formatter per results file: (data) -> the headline cell ------------------------------

def store_bench(d: dict) -> str:
    h = d["headline"]
    return (f"search p50 gRPC/local **{_f(h['search_grpc_over_local_p50'])}x**, readout "
            f"**{_f(h['readout_grpc_over_local_p50'])}x** (target <= 2x); bytes/token pushdown "
            f"{h['pushdown_bytes_per_token'] / 1000:.1f} KB vs fetch {h['fetch_bytes_per_token'] / 1000:.1f} KB")


def kernels(d: dict) -> str:
    bw, tm = d["readout_bandwidth"], d["timings_ms"]
    pk = tm.get("pk_search", {})
    out = (f"readout forward {_f(tm['readout']['triton_fwd'], 3)} ms = {_p(bw['fwd_frac_of_copy'])} of copy bandwidth "
           f"(each distinct row counted once: {_p(bw.get('fwd_frac_of_copy_strict'))}); fwd+bwd "
           f"{_f(tm['readout']['triton_fwdbwd'])} ms = {_p(bw['fwdbwd_frac_of_copy'])} counting bytes per gathered "
           f"occurrence, **{_p(bw.get('fwdbwd_frac_of_copy_strict'))}** counting each distinct row once (target 75%)")
    if pk:
        out += f"; pk search {_f(pk['torch_ref_float32'] / pk['triton_float32'])}x torch fp32 (target 3x)"
    return out


def _presets(d: dict) -> dict[str, str]:
    seen: dict[str, set] = {}
    for runs in d.get("runs_by_seed", {}).values():
        for key, r in runs.items():
            seen.setdefault(key, set()).add(r.get("preset", "?"))
    return {k: "+".join(sorted(v)) for k, v in seen.items()}


def _range(s: dict, digits: int = 3) -> str:
    return f"{_f(s['median'], digits)} [{_f(s['min'], digits)}, {_f(s['max'], digits)}]"


def quality_protocol(d: dict) -> str:
    """A run of issue 24's protocol (benchmarks/quality_protocol.py)."""
    h = d["headline"]
    fams, sp = list(h["test"]), h["split"]
    counts = [h["tuning_trials_per_family"][f] for f in fams]
    trials = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
    out = (f"variant of each family chosen on the tuning half ({trials} trials per family, seeds "
           f"{h['tuning_seeds']}): " + ", ".join(f"{f} -> {h['chosen'][f]}" for f in fams)
           + f". Test half ({sp['test_facts']} facts, {sp['test_prompts']} held-out-phrasing prompts), {h['steps']} steps, "
           f"{len(h['seeds'])} seeds, recall median [min, max]: "
           + "; ".join(f"{f} {_range(h['test'][f]['recall_heldout'])}" for f in fams))
    k = h.get("knowledge_minus_best_baseline")
    if k:
        ps, bs = k["paired_by_seed"], k["bootstrap_over_test_facts"]
        out += (f". Knowledge minus the best baseline ({k['baseline']}): **{ps['mean']:+.3f}** ± {_f(ps['se'], 3)} "
                f"(seed s.e.), 95% bootstrap over test facts [{bs['lo']:+.3f}, {bs['hi']:+.3f}]")
    out += "; trained phrasing " + " / ".join(_f(h["test"][f]["recall_seen"]["median"], 3) for f in fams)
    return out


def quality(d: dict) -> str:
    h = d["headline"]
    if "test" in h:
        return quality_protocol(d)
    keys = [k for k in ("dense", "dense_2x", "moe", "knowledge") if k in h["recall_heldout"]]
    se = h.get("recall_heldout_se", {})
    out = (f"models {' / '.join(keys)} (knowledge preset: {_presets(d).get('knowledge', '?')}), "
           f"{len(h['seeds'])} seeds, corpus {h['corpus']}: recall on held-out phrasings "
           + " / ".join(f"{_f(h['recall_heldout'][k], 3)} ± {_f(se.get(k), 3)}" for k in keys))
    if "knowledge_recall_minus" in h:
        m, s = h["knowledge_recall_minus"], h["knowledge_recall_minus_se"]
        wins = sum(bool(v) for v in h.get("knowledge_wins_per_seed", {}).values())
        out += ("; knowledge minus each, paired by seed: "
                + " / ".join(f"{m[k]:+.3f} ± {_f(s[k], 3)}" for k in m)
                + f", ahead of all on {wins} of {len(h['seeds'])} seeds")
    out += f"; trained phrasing {_by(h['recall_seen_phrasing'], keys, lambda x: _f(x, 3))}"
    if h.get("remote_over_fastest_local_tokens_per_s") is not None:
        out += f"; remote / fastest in-process tokens/s {_f(h['remote_over_fastest_local_tokens_per_s'])}"
    elif h.get("remote_over_local_tokens_per_s") is not None:
        out += (f"; remote / in-process tokens/s of the same readout mode {_f(h['remote_over_local_tokens_per_s'])} "
                "(not against the fastest in-process run)")
    return out


def cluster_bench(d: dict) -> str:
    h = d["headline"]
    swaps = [s["seconds"] for s in d["swap"]]
    swaps_sorted = sorted(swaps)
    med = swaps_sorted[len(swaps) // 2] if len(swaps) % 2 else sum(swaps_sorted[len(swaps) // 2 - 1:][:2]) / 2
    return (f"**{h['failed_calls_during_swap']}** failed calls during swap, {h['failed_calls_during_scale']} during "
            f"scale; swap median {_f(med)} s (min {_f(min(swaps))}, max {_f(max(swaps))}, {len(swaps)} swaps); "
            f"scale {_f(h['scale_seconds_1m_rows'], 0)} s; throughput 4/1 shards {_f(h['throughput_4_over_1_shards'])}x")


def continual(d: dict) -> str:
    h = d["headline"]
    if "new_recall_test_heldout" not in h:                   # a run of the old protocol
        return ("old protocol (lrs and parts chosen on the reported facts): new-fact recall "
                + " / ".join(f"{m} {_p(v)}" for m, v in h["new_recall"].items()))
    ms = list(h["new_recall_test_heldout"])
    ci = h["new_recall_test_heldout_ci95"]
    out = (f"{h['split']}; lr of every method chosen on the tuning half ({', '.join(f'{m} {n}' for m, n in h['tuning_trials'].items())} "
           f"trials). Test half, new-fact recall on held-out phrasings (base {_p(h['base_new_recall_test_heldout'])}): "
           + "; ".join(f"{m} **{_p(h['new_recall_test_heldout'][m])}** [{_p(ci[m][0], 0)}, {_p(ci[m][1], 0)}]" for m in ms)
           + f". Old answers on held-out phrasings lost / gained (of {h['old_heldout_right_at_base']} right): "
           + "; ".join(f"{m} {h['old_heldout_lost'][m]} / {h['old_heldout_gained'][m]}" for m in ms)
           + f"; on a trained phrasing (of {h['old_seen_right_at_base']}): "
           + "; ".join(f"{m} {h['old_seen_lost'][m]} / {h['old_seen_gained'][m]}" for m in ms))
    cmp = continual_comparison(d)
    if cmp:
        out += (f". new_rows minus {cmp['baseline']} (the baseline with the best tuning-half score), paired by test "
                f"fact: {cmp['mean'] * 100:+.1f} points [{cmp['lo'] * 100:+.1f}, {cmp['hi'] * 100:+.1f}]")
    if h.get("dropped"):
        out += ". Dropped: " + "; ".join(f"{m} ({why})" for m, why in h["dropped"].items())
    if h.get("methods_not_run_yet"):
        out += f". Not run (cut off): {', '.join(h['methods_not_run_yet'])}"
    if d.get("protocol", {}).get("reduced"):
        out += ". Reduced tuning (same for all): see the JSON's protocol"
    return out


def continual_comparison(d: dict) -> dict | None:
    """new_rows against the baseline whose chosen setting scored best on the tuning half
    (chosen without looking at the test half): the mean paired difference of test-half
    held-out recall with its 95% bootstrap interval."""
    from benchmarks.continual_eval import bootstrap
    test, tuning = d.get("test", {}), d.get("tuning", {})
    others = [m for m in test if m != "new_rows" and m in tuning]
    if "new_rows" not in test or not others:
        return None

    def tune_score(m):
        t = tuning[m]
        return t["grid"][f"{t['chosen']:g}"]["score"]
    best = max(others, key=tune_score)
    return {"baseline": best, **bootstrap(test["new_rows"]["new_right"], test[best]["new_right"])}


def interpret(d: dict) -> str:
    h = d["headline"]
    if "ablation_by_rows_per_fact" in h:
        by = h["ablation_by_rows_per_fact"]
    else:                                                    # older runs: the per-size summary lies beside,
        by = {r: dict(s) for r, s in d["ablation"]["by_rows_per_fact"].items()}   # the s.e. from its groups
        for r, s in by.items():
            sel = [e["target_drop"] - e["others_drop"] for e in d["ablation"]["runs"] if str(e["rows_per_fact"]) == r]
            if len(sel) > 1:
                m = sum(sel) / len(sel)
                s["selectivity_se"] = (sum((x - m) ** 2 for x in sel) / (len(sel) - 1) / len(sel)) ** 0.5
    sizes = "; ".join(f"{r} rows/fact: those facts' recall -{_p(s['target_drop'], 0)}, others' -{_p(s['others_drop'], 0)}, "
                      f"random rows -{_p(s['random_rows_target_drop'], 0)}"
                      + (f" (selectivity {_p(s['selectivity'], 0)} ± {_p(s['selectivity_se'], 0)} s.e. over fact groups)"
                         if s.get("selectivity_se") is not None else "")
                      for r, s in by.items())
    return (f"every ablation size: {sizes}; {_p(h['usage_fraction_used'], 0)} of rows used, "
            f"KL from uniform {_f(h['usage_kl_from_uniform'])}, top-1% share {_p(h['usage_top1pct_share'])}")


def capacity(d: dict) -> str:
    h = d["headline"]
    keys = list(h["bits"])
    out = (f"N = {h['people']} people, {h['exposures']} exposures, seeds {h['seeds']}: bits stored "
           + " / ".join(f"{k} {h['bits'][k]:.0f} ± {h['bits_se_over_seeds'][k]:.0f}" for k in keys)
           + f" of {h['information_bits']:.0f}; knowledge / dense bits per active parameter "
           f"**{_f(h['knowledge_over_dense_bits_per_active_param'])}x** (target 4x)")
    if h.get("knowledge_over_moe_bits_per_active_param") is not None:
        out += f", / MoE {_f(h['knowledge_over_moe_bits_per_active_param'])}x"
    if h.get("knowledge_over_dense_tokens_per_s") is not None:
        out += f"; tokens/s knowledge / dense **{_f(h['knowledge_over_dense_tokens_per_s'])}x** (target 0.7x"
        spread = h.get("knowledge_over_dense_tokens_per_s_spread")
        out += (f"; by the timed steps' quartiles {_f(spread['quartile_range'][0])}-{_f(spread['quartile_range'][1])}x)"
                if spread else ")")
    if h.get("knowledge_over_moe_tokens_per_s") is not None:
        out += f" (knowledge / MoE {_f(h['knowledge_over_moe_tokens_per_s'])}x: the knowledge layers' own cost)"
    if h.get("knowledge_dense_over_dense_bits_per_active_param") is not None:
        out += (f"; the store without MoE (knowledge_dense) / dense: bits per active parameter "
                f"{_f(h['knowledge_dense_over_dense_bits_per_active_param'])}x")
        if h.get("knowledge_dense_over_dense_tokens_per_s") is not None:
            out += f", tokens/s {_f(h['knowledge_dense_over_dense_tokens_per_s'])}x"
    if h.get("knowledge_over_dense_bits_per_train_flop") is not None:
        fl = h["train_flops_per_token"]
        out += (f"; training FLOPs per token knowledge / dense {_f(fl['knowledge'] / fl[h['dense_baseline']])}x, "
                f"bits per training FLOP {_f(h['knowledge_over_dense_bits_per_train_flop'])}x")
    out += f"; targets {'met' if h['target']['met'] else 'not all met'}"
    tuned = (h.get("lr") or {}).get("tuned") or {}
    untuned = [m for m in keys if not tuned.get(m)]
    if untuned:   # a ratio against a baseline at an untuned lr says less than it seems to
        out += f"; lr not tuned for {', '.join(untuned)}"
    return out


def capacity_tune(d: dict) -> str:
    h = d["headline"]
    per = "; ".join(f"{m} " + ", ".join(f"{lr} {b / 1000:.0f}k" for lr, b in bits.items())
                    + f" -> {h['chosen_lr'][m]:g}" + (" (grid edge)" if h["at_grid_edge"][m] else "")
                    for m, bits in h["bits"].items())
    return f"N = {h['people']} people, seed {h['seed']} (not a reported seed); bits stored by lr: {per}"


def knobs(d: dict) -> str:
    h = d["headline"]
    sp = h["cache_generation_speedup"]
    partial = {k: v for k, v in sp.items() if not (k.endswith("_warm") and k.split("_")[1] == str(h["table_rows"]))}
    whole = {k: v for k, v in sp.items() if k not in partial}
    reps = h.get("cache_repeats", 1)
    return (f"recall at k = {', '.join(h['recall_by_k'])}: {_by(h['recall_by_k'], list(h['recall_by_k']), lambda x: _p(x))}; "
            f"reorder pages/token x{_f(h['reorder_pages_ratio'])}; whole-table warm cache "
            + ", ".join(f"{_f(v)}x" for v in whole.values())
            + f" tokens/s; every other cache setting {_f(min(partial.values()))}-{_f(max(partial.values()))}x "
            f"({len(partial)} settings; " + (f"medians of {reps} runs each)" if reps > 1 else "one run each)"))


def scale_bench(d: dict) -> str:
    h = d["headline"]
    host = d.get("phases", {}).get("host", {}).get("16M", {})
    out = (f"rows on one GPU (d_v 1024 bf16) **{h['max_rows_one_gpu']:,}** (target >= 16,777,216); 16M rows created in "
           f"**{_f(h['create_s_16m'], 1)} s** (<= 30); optimizer state / values **{_f(h['optimizer_bytes_over_values'], 4)}** "
           f"(<= 0.15); snapshot {_f(h['snapshot_gbps'])} / cold load {_f(h['load_gbps'])} GB/s (dd "
           f"{_f(h['disk_write_gbps'])} / {_f(h['disk_read_gbps'])}); 1% incremental snapshot "
           f"**{_f(h['incremental_snapshot_speedup_1pct'], 1)}x** faster (>= 10); 16M swap {_f(h['swap_s_16m'], 1)} s, "
           f"**{h['swap_failed_calls']}** failed calls; 16M search {_f(h['search_qps_16m'] / 1e6)}M q/s, fetch "
           f"{_f(h['fetch_rows_per_s_16m'] / 1e6, 1)}M rows/s")
    if host:
        out += (f"; the 16M table in pinned host memory (GPU capped): search {_f(host['search']['qps'] / 1e3, 0)}k q/s, "
                f"fetch {_f(host['fetch']['rows_per_s'] / 1e6)}M rows/s")
    return out


def wire_bench(d: dict) -> str:
    h, t = d["headline"], d.get("train", {})
    out = (f"fetch of {h['fetch_rows']:,} rows x 1024 bf16: same host ({h['same_host_transport']}) "
           f"**{_f(h['fetch_gbps_same_host'], 1)} GB/s** (>= 10), gRPC over TCP **{_f(h['fetch_gbps_tcp'])} GB/s** (>= 2), "
           f"in process {_f(h['fetch_gbps_in_process'], 0)} GB/s; readout same host {_f(h['readout_gbps_same_host'])} GB/s; "
           f"search 4,096 q k 32 remote **{_f(h['search_ms_4096_remote'], 1)} ms** (<= 10)"
           + (f" [{_f(h['search_ms_4096_remote_min'], 1)}, {_f(h['search_ms_4096_remote_max'], 1)}]"
              if h.get("search_ms_4096_remote_min") is not None else ""))
    if h.get("remote_over_local_tokens_per_s_d1024") is not None:
        out += (f"; d1024 training remote / in process **{_f(h['remote_over_local_tokens_per_s_d1024'])}** "
                f"(median of {len(t.get('pairs', []))} pairs, min {_f(t.get('remote_over_local_min'))}, max "
                f"{_f(t.get('remote_over_local_max'))}; >= 0.8), losses exact: {t.get('losses_exact')}")
    if h.get("fetch_gbps_tcp_tls") is not None:
        return out + (f"; over TLS (loopback, self-signed): gRPC fetch {_f(h['fetch_gbps_tcp_tls'])} GB/s, "
                      f"search {_f(h['search_ms_4096_remote_tls'], 1)} ms")
    return out + f"; {h.get('tls', '')}"


def lr_note(r: dict) -> str:
    return f" (lr {r['lr']:g})"


def optimizer_tradeoff(d: dict) -> str:
    h = d["headline"]
    tuned = "tuning_seeds" in h             # issue 24's protocol: each kind's row lr chosen on a tuning half
    parts = []
    for kind, r in h["optimizers"].items():
        loss, rec = r["heldout_loss"], r["recall_heldout"]
        parts.append(f"{kind}{lr_note(r) if tuned else ''} loss {_f(loss['median'])} "
                     f"[{_f(loss['min'])}, {_f(loss['max'])}], recall {_p(rec['median'])} "
                     f"[{_p(rec['min'])}, {_p(rec['max'])}], state {_p(r['optimizer_over_values'])} of values")
    n = next(iter(h["optimizers"].values()))["heldout_loss"]["n"]
    if not tuned:
        return (f"{d['config']['steps']} steps, one row lr for every kind (untuned); held-out loss median "
                f"[min, max] over {n} seeds: " + "; ".join(parts))
    trials = sorted(set(h["tuning_trials_per_kind"].values()))
    return (f"each kind's row lr chosen on the tuning half ({'/'.join(map(str, trials))} trials per kind: factors "
            f"{', '.join(f'{x:g}' for x in h['lr_grid_factors'])} of its centre, seed {h['tuning_seeds']}); test half, "
            f"{h['steps']} steps, median [min, max] over {n} seeds: " + "; ".join(parts))


def transport_bench(d: dict) -> str:
    h = d["headline"]
    return ("fetch of 100k rows, GB/s (absolute figures mean little on 2 loaded cores): " +
            ", ".join(f"{k.removeprefix('fetch_gbps_').removesuffix('_100000')} {_f(v, 3)}"
                      for k, v in h.items() if k.startswith("fetch_gbps_")))


def reliability(d: dict) -> str:
    h = d["headline"]
    r = h["recover_s_after_shard_restart"]
    return (f"**{h['cases']}** distinct (RPC, field, attack) cases with and without credentials, "
            f"{h.get('fuzz_iterations', 0):,} fuzz messages: internal errors **{h['internal_errors']}**, "
            f"unauthenticated mutations **{h['unauthenticated_mutations']}**, non-finite rows **{h['nonfinite_rows']}**; "
            f"failed calls during {h.get('swaps', '?')} back-to-back swaps **{h['failed_calls_during_swaps']}**; "
            f"first call after a shard restart p95 **{_f(r['p95'])} s** (p50 {_f(r['p50'])})")


def launch_count(d: dict) -> str:
    h = d["headline"]
    ops, ms = h["aten_ops_per_step"], h.get("step_ms", {})
    parts = []
    for m, label in (("moe", "MoE"), ("knowledge", "MoE + knowledge")):
        paths = [p for p in ("loop", "batched", "grouped") if f"{m}_{p}" in ops]
        if paths:
            parts.append(f"{label} " + ", ".join(
                f"{p} {ops[f'{m}_{p}']:,.0f}" + (f" ({_f(ms[f'{m}_{p}'], 1)} ms)" if f"{m}_{p}" in ms else "")
                for p in paths))
    if "knowledge_dense" in ops:
        parts.append(f"knowledge_dense {ops['knowledge_dense']:,.0f}"
                     + (f" ({_f(ms['knowledge_dense'], 1)} ms)" if "knowledge_dense" in ms else ""))
    dense = f"dense {ops['dense']:,.0f}" + (f" ({_f(ms['dense'], 1)} ms)" if "dense" in ms else "")
    out = f"batch {h['batch_size']} x {h['seq_len']}, ops (step time) per step: {dense}; " + "; ".join(parts)
    syncs = {k: v for k, v in (h.get("host_syncs_cuda_per_step") or {}).items() if v is not None}
    if syncs:
        out += "; CUDA syncs per step: " + ", ".join(f"{k} {v:.0f}" for k, v in syncs.items())
    return out


def ray_placement(d: dict) -> str:
    h = d["headline"]
    if "error" in h:
        return f"failed: {h['error'].strip().splitlines()[-1][:200]}"   # the exception, not the traceback
    places = ", ".join(f"{s['placement']} -> {s['device']}{' (pinned)' if s['pinned'] else ''}" for s in h["shards"])
    sw = h["swap_s"]
    scale = (f"scale to {len(h['scaled_shards'])} shards {_f(h['scale_s'], 1)} s" if h.get("scale_s") is not None
             else f"scale skipped ({h.get('scale_skipped') or h.get('scale_error')})")
    return (f"{h['rows']:,} rows on Ray shard actors: {places}; `kstore status` agrees: {h['kstore_status_ok']}; "
            f"{sw['n']} swaps median {_f(sw['median'], 1)} s [{_f(sw['min'], 1)}, {_f(sw['max'], 1)}]; {scale}; "
            f"**{h['failed_calls']}** failed and **{h['mixed_answers']}** mixed of {h['calls']:,} calls; "
            f"{_f(h['qps_steady'], 0)} calls/s steady")


# (results file, command, what it measures, formatter)
ROWS: list[tuple[str, str, str, Callable[[dict], str]]] = [
    ("store_bench.json", "`python -m benchmarks.store_bench`",
     "2^20 product + 65,536 flat rows, 3 shards: in-process vs gRPC loopback", store_bench),
    ("kernels.json", "`python benchmarks/kernels.py` (CUDA)",
     "Triton readout (T=16384, k=32, d_v=1024, N=2^20, bf16) and product-key search", kernels),
    ("quality.json", "`python benchmarks/quality.py --no-throughput`",
     "dense / MoE / MoE+knowledge at matched active params, medium corpus (CPU), each family's variant "
     "chosen on a tuning half of the facts, reported on the test half", quality),
    ("quality_h200_medium_para.json", "`python benchmarks/quality.py --device cuda --corpus medium-para ...`",
     "the same four models at 12x the tokens, 9 training paraphrases per relation (GPU)", quality),
    ("cluster_bench.json", "`python -m benchmarks.cluster_bench`", "1M-row table on Ray shard actors, 2 client threads",
     cluster_bench),
    ("continual.json", "`python -m benchmarks.continual`",
     "learn the corpus' 71 new facts (medium corpus, base: knowledge layer in block 1): new rows vs full FT and LoRA "
     "(each with and without replay of old text) vs sparse memory FT, 100 steps each", continual),
    ("interpret.json", "`python -m benchmarks.interpret`", "ablate the rows a fact's answer uses; usage statistics",
     interpret),
    ("capacity.json", "`python benchmarks/capacity.py --device cuda ...` (commands: `benchmarks/CAPACITY_NOTES.md`)",
     "bits of knowledge stored per active parameter (bioS, 100 exposures), dense / MoE / MoE + knowledge at "
     "~1.07M active parameters, and training tokens/s alone on the card (GPU)", capacity),
    ("capacity_tune.json", "`python benchmarks/capacity_tune.py --device cuda --people 10000 ...`",
     "each capacity model's lr, chosen by bits stored on a population no reported run sees (GPU)", capacity_tune),
    ("capacity_cpu_small.json", "`python benchmarks/capacity.py --size tiny ...`",
     "bits of knowledge stored per active parameter (bioS), CPU check at small N", capacity),
    ("knobs.json", "`python -m benchmarks.knobs`", "k at inference, row reordering, hot-row cache over gRPC", knobs),
    ("scale_bench.json", "`python -m benchmarks.scale_bench` (GPU; commands: `benchmarks/STORE_NOTES.md`)",
     "the store at memory-layer scale: 1M / 4M / 16M rows of 1024 bf16 on one GPU and in pinned host memory "
     "(the device copy's `.git` named the session's base commit: the tree was main at fc5efb1, STORE_NOTES)",
     scale_bench),
    ("wire_bench.json", "`python benchmarks/wire_bench.py --device cuda` (commands: `benchmarks/WIRE_NOTES.md`)",
     "the data plane per transport (in process, gRPC, CUDA IPC, shm; gRPC also over TLS) and d1024 training "
     "with the store in 2 shard processes, all phases at one commit", wire_bench),
    ("ray_placement.json", "`python -m benchmarks.ray_placement --device cuda` (GPU)",
     "a real Ray cluster serving the 16M-row table (34 GB): shards on fractional GPUs and in pinned host memory, "
     "hot swaps (one a rollback) under 4 client threads; the scale needs a second full copy on disk", ray_placement),
    ("ray_placement_4m.json", "`python -m benchmarks.ray_placement --device cuda --rows 4M` (GPU)",
     "the same at 4M rows, where the disk holds a second copy: hot swaps and a scale 4 -> 6", ray_placement),
    ("launch_count_cuda.json", "`python -m benchmarks.launch_count --device cuda --batch-size 128`",
     "aten ops and wall time per training step of the capacity models, the MoE's experts looped, batched "
     "(padded) and as bf16 grouped GEMMs, side by side in one run (GPU, TF32)", launch_count),
    ("launch_count_parts/launch_count_cuda_fac56a5.json",
     "`python -m benchmarks.launch_count --device cuda --batch-size 128 --models dense,knowledge,knowledge_dense,moe "
     "--experts batched`",
     "the same step after the MoE's scan fix, the experts batched, with the store on a dense FFN (knowledge_dense) "
     "beside (GPU, TF32)", launch_count),
    ("optimizer_tradeoff.json", "`python benchmarks/optimizer_tradeoff.py --model small-knowledge --steps 600 --jobs 2 --lr-grid 0.01,0.1,1,10`",
     "the quality benchmark's chosen knowledge model trained with each row optimizer, each kind's row lr chosen "
     "on the tuning half, same seeds and data (CPU)",
     optimizer_tradeoff),
    ("transport_bench_cpu.json", "`python benchmarks/transport_bench.py`",
     "same-host and cross-host transports against gRPC (CPU)", transport_bench),
    ("reliability.json", "`python -m benchmarks.reliability`",
     "hostile clients: every RPC found by reflection, each field attacked, swaps and restarts under load (CPU)",
     reliability),
]


def machine(d: dict) -> str:
    p = d.get("provenance")
    if isinstance(p, dict) and isinstance(p.get("machine"), dict):
        m = p["machine"]
        dev = p.get("device", "")
        reused = d.get("reused") or []
        if reused and d.get("device") and d["device"] != dev:   # a merge: the runs ran on another machine
            froms = sorted({str(r.get("from_commit") or r.get("commit"))[:7] for r in reused})
            return (f"{d['device'].split('; CPU:')[0][:60]}; runs at commit {', '.join(froms)}, "
                    f"merged at {p['commit'][:7]}{' (dirty)' if p.get('dirty') else ''}, {p['date'][:10]}")
        where = dev if dev and not dev.startswith("cpu") else f"{m.get('cpu_model')}, {m.get('cores')} cores"
        return f"{where}; commit {p['commit'][:7]}{' (dirty)' if p.get('dirty') else ''}, {p['date'][:10]}"
    if isinstance(p, dict):
        return f"{p.get('device', d.get('device', '?'))[:60]}; commit {str(p.get('commit'))[:7]}"
    return str(d.get("device", "?"))[:60]


def table() -> str:
    lines = ["| script | what it measures | headline | machine, provenance |", "| --- | --- | --- | --- |"]
    for name, cmd, what, fmt in ROWS:
        path, archived = RESULTS / name, False
        if not path.exists():
            path, archived = RESULTS / "archive" / name, True
        if not path.exists():
            lines.append(f"| {cmd} | {what} | not run | |")
            continue
        d = json.loads(path.read_text())
        cell = fmt(d).replace("|", "/")
        if archived:
            cell = f"*archived run, no provenance ([why](benchmarks/results/archive/NOTE.md))*: {cell}"
        lines.append(f"| {cmd} | {what} | {cell} | {machine(d)} (`{path.relative_to(ROOT)}`) |")
    return "\n".join(lines) + "\n"


def render(readme: str) -> str:
    """`readme` with the text between the markers replaced by the generated table."""
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no table markers ({BEGIN} ... {END})")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the table into README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md's table differs")
    args = ap.parse_args(argv)
    readme = README.read_text()
    if args.write:
        README.write_text(render(readme))
    elif args.check:
        if render(readme) != readme:
            print("README.md's Benchmarks table differs: run python -m benchmarks.readme_table --write")
            return 1
    else:
        print(table(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
