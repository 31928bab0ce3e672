"""Ops per training step of the capacity models (issue 22): what a launch-bound GPU pays for.

A ~1M-parameter model on a GPU is bound by kernel launches and host work, not FLOPs, so the
number of aten ops one training step runs (forward, backward, clip, optimizer, the store's
step barrier) predicts its GPU time better than its FLOPs do. This script counts them with
`torch.profiler` for each capacity preset (benchmarks/capacity_train.py's training step,
on the bioS stream), and for the MoE models with the routed experts run both ways
(model_worker/moe.py: batched over a padded block, or the per-expert loop), so the change
between the two is measured side by side in one run. It also counts the host syncs the
step makes (Tensor.item / __bool__ / __int__ / __float__ / tolist calls from our code and torch's;
on the CPU they wait for nothing, and the plain AdamW loop there reads its step count with
.item() twice per parameter tensor, which the GPU's fused AdamW does not). That count misses
the syncs inside aten ops (nonzero, boolean-mask indexing, unique, bincount, .cpu(), ...): on a
GPU the timed steps also run under torch.cuda.set_sync_debug_mode("warn"), whose warnings count
every host wait (host_syncs_cuda_per_step; None on the CPU, where nothing is waited for),
each by the Python line whose call waited (cuda_sync_sources_per_step).

    python -m benchmarks.launch_count                                   # CPU, ~1 min
    python -m benchmarks.launch_count --device cuda --batch-size 128    # on the GPU machine, ~1 min

Each run also gives the matmul FLOPs a training token costs (benchmarks/capacity_flops.py)
and the rate the timed step reaches with them (achieved_tflop_per_s): at ~1M parameters a
few percent of the card's peak, which is what launch-bound means in FLOP/s.

On a GPU it also records the device's kernel time per step (CUDA activity of the profiler)
against the step's wall time without the profiler: a device busy fraction well below 1 means
the step is bound by the host (launches, Python, syncs), near 1 by the kernels; and the ops
that take the most device time.

Ops are counted over --steps steps after --warm steps (the router's balancing moves between
steps; the count is the median step's), then --steps more steps are timed without the
profiler. Counts include view ops (as_strided, view, ...): they launch no kernel but cost
host time. With --sources N, each run also lists the N lines of code its ops come from most
(benchmarks/op_sources.py; forward ops by the function that called them, backward ops by
the forward op that made their autograd node). Writes benchmarks/results/launch_count_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.capacity import PRESETS as CAPACITY_PRESETS
from benchmarks.capacity_flops import flops_per_token
from benchmarks.capacity_train import RunSpec, model_config, open_table, run_data, train_config, train_step
from benchmarks.common import write_result
from benchmarks.op_sources import op_sources
from model_worker.data.bios.batches import BioStream
from model_worker.model import Transformer
from model_worker.moe import RoutedExperts
from model_worker.train import make_optimizer

# the capacity models by size (gpu: ~1M active, gpu4m: ~4M); knowledge_dense is the store
# without MoE: the knowledge layers' own cost
SIZES = {size: {m: p for m, p in by.items() if m != "dense_gelu"}
         for size, by in CAPACITY_PRESETS.items() if size != "tiny"}
PRESETS = SIZES["gpu"]
DENSE_FFN = {"dense", "knowledge_dense"}   # no routed experts to run more than one way
SYNC_METHODS = ("item", "__bool__", "__int__", "__float__", "tolist")


@contextlib.contextmanager
def counting_syncs(counter: Counter):
    """Count the Tensor methods that make the host wait for the device."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            counter[name] += 1
            return fn(self, *a, **k)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def counting_cuda_syncs(counter: Counter, enabled: bool = True, where: Counter | None = None):
    """Count every host sync CUDA ops make (torch's sync debug mode warns at each, wherever the
    op was called from: our code, torch's, or inside an aten op); nothing when not enabled.
    where: also counted by the Python line the warning names (the call that waited)."""
    if not enabled:
        yield counter
        return
    saved = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")      # every sync, not once per place
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(saved)
    for w in seen:
        if "synchronizing CUDA operation" in str(w.message):
            counter["cuda_syncs"] += 1
            if where is not None:
                where[f"{_repo_path(w.filename)}:{w.lineno}"] += 1


def _repo_path(filename: str) -> str:
    """A file's path from the repository's root (or from site-packages, for torch's own)."""
    for root in (str(Path(__file__).resolve().parents[1]) + "/", "site-packages/", "dist-packages/"):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


def count_step(model_name: str, experts: str, args, root: Path) -> dict:
    """Ops, syncs and step time of one capacity model; experts: 'batched', 'loop', 'grouped'
    (or 'none' for the dense model)."""
    spec = RunSpec(model=model_name, preset=SIZES[args.size][model_name], people=args.people, seed=0,
                   batch_size=args.batch_size, device=args.device, threads=args.threads)
    work = root / f"{model_name}_{experts}"
    work.mkdir(parents=True)
    data = run_data(spec, root)
    mcfg = model_config(spec, data.tokenizer.vocab_size)
    stream = BioStream(data.population, data.pieces, seed=0, exposures=1 << 20, seq_len=spec.seq_len,
                       batch_size=spec.batch_size)
    tables = open_table(spec, mcfg, work, None) if mcfg.knowledge else contextlib.nullcontext()
    ops, syncs, seconds, kernel_s, kernels, timed, cuda_syncs = [], [], [], [], [], [], []
    top: Counter = Counter()
    sources: Counter = Counter()
    sync_sources: Counter = Counter()    # the CUDA syncs by the line that made them (a GPU only)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True      # as the capacity runs train (capacity_train.advance)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tables as table:
        model = Transformer(mcfg, table).to(args.device)
        for m in model.modules():
            if isinstance(m, RoutedExperts):
                m.mode = "loop" if experts == "loop" else "padded"     # force one path
                m.grouped_bf16 = experts == "grouped"
        optimizer = make_optimizer(model, train_config(spec, work))
        for step in range(args.warm + args.steps):
            batch = stream.batch().to(args.device)
            if step < args.warm:
                train_step(model, optimizer, table, batch, 1e-3, step)
                continue
            counter: Counter = Counter()
            t0 = time.perf_counter()
            with profile(activities=activities, with_stack=args.sources > 0) as prof, counting_syncs(counter):
                train_step(model, optimizer, table, batch, 1e-3, step)
            seconds.append(time.perf_counter() - t0)
            averages = prof.key_averages()
            ops.append(sum(e.count for e in averages if e.key.startswith("aten::")))
            syncs.append(sum(counter.values()))
            if args.sources:
                sources.update(op_sources(prof.events()))
            if cuda:
                # The kernels themselves (device events; an aten op's own device total would count
                # its kernels a second time): their summed time, and the ones taking the most.
                device_events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
                kernel_s.append(sum(e.time_range.elapsed_us() for e in device_events) / 1e6)
                kernels.append(len(device_events))
                for e in device_events:
                    top[e.name[:120]] += e.time_range.elapsed_us() / 1e6 / args.steps
        # The same steps without the profiler: the wall time a step costs (train_step waits for it),
        # and on a GPU every host sync it makes (a warning each: a few microseconds against ~10 ms).
        for step in range(args.steps):
            batch = stream.batch().to(args.device)
            waits: Counter = Counter()
            t0 = time.perf_counter()
            with counting_cuda_syncs(waits, enabled=cuda, where=sync_sources):
                train_step(model, optimizer, table, batch, 1e-3, args.warm + args.steps + step)
            timed.append(time.perf_counter() - t0)
            cuda_syncs.append(waits["cuda_syncs"])
        params = model.count_params()
        model.close()
    stream.close()
    # matmul FLOPs a training token costs (capacity_flops: counted on the CPU, the experts on
    # the pairs routed), and the rate the step reaches: how launch-bound it is, in FLOP/s
    per_token = flops_per_token(spec)["train"]
    return {"model": model_name, "preset": spec.preset, "experts": experts, "train_flops_per_token": per_token,
            "achieved_tflop_per_s": per_token * spec.batch_size * spec.seq_len / statistics.median(timed) / 1e12,
            "aten_ops_per_step": statistics.median(ops), "aten_ops_min": min(ops), "aten_ops_max": max(ops),
            "host_syncs_per_step": statistics.median(syncs),
            # every host wait on a GPU (torch's sync debug mode); unknown on the CPU
            "host_syncs_cuda_per_step": statistics.median(cuda_syncs) if cuda else None,
            **({"cuda_sync_sources_per_step": {k: v / args.steps for k, v in sync_sources.most_common()}}
               if cuda else {}),
            "profiled_step_s_median": statistics.median(seconds), "step_s_median": statistics.median(timed),
            "step_s_min": min(timed), "step_s_max": max(timed), "params": params,
            **({"top_op_sources_per_step": {k: v / args.steps for k, v in sources.most_common(args.sources)}}
               if args.sources else {}),
            **({"device_kernel_s_per_step": statistics.median(kernel_s), "kernels_per_step": statistics.median(kernels),
                "device_busy_fraction": statistics.median(kernel_s) / statistics.median(timed),
                "top_device_ops_s_per_step": dict(top.most_common(12))} if cuda else {})}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="dense,moe,knowledge")
    ap.add_argument("--people", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu", help="the models' size: ~1M (gpu) or ~4M (gpu4m)")
    ap.add_argument("--experts", default="batched,loop",
                    help="MoE expert paths to count: batched, loop, grouped (bf16 grouped GEMMs; sm90 on a GPU)")
    ap.add_argument("--sources", type=int, default=0,
                    help="list the N lines of code each run's ops come from most (0: off)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/launch_count_<cpu|cuda>.json")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.experts = [e.strip() for e in args.experts.split(",") if e.strip()]
    if not args.experts or set(args.experts) - {"batched", "loop", "grouped"}:
        raise SystemExit(f"launch_count: --experts takes batched, loop, grouped; got {args.experts}")
    unknown = sorted(set(models) - set(PRESETS))
    if unknown:
        raise SystemExit(f"launch_count: unknown model(s) {unknown}; choose from {sorted(PRESETS)}")
    out = args.out or f"benchmarks/results/launch_count_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    root = Path(tempfile.mkdtemp(prefix="launch_count_"))
    rows = []
    try:
        for m in models:
            for experts in (args.experts if m not in DENSE_FFN else ("none",)):
                rows.append(count_step(m, experts, args, root))
                r = rows[-1]
                cuda_syncs = r["host_syncs_cuda_per_step"]
                print(f"{m:10s} {experts:8s} {r['aten_ops_per_step']:>7.0f} ops/step  "
                      f"{r['host_syncs_per_step']:>4.0f} syncs/step"
                      + (f" ({cuda_syncs:.0f} on CUDA)" if cuda_syncs is not None else "")
                      + f"  {r['step_s_median'] * 1e3:8.1f} ms/step"
                      + (f"  device busy {r['device_busy_fraction']:.0%}" if "device_busy_fraction" in r else ""),
                      flush=True)
                for source, n in r.get("top_op_sources_per_step", {}).items():
                    print(f"    {n:8.1f}  {source}")
                for line, n in r.get("cuda_sync_sources_per_step", {}).items():
                    print(f"    {n:8.1f}  CUDA sync at {line}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    by = {(r["model"], r["experts"]): r["aten_ops_per_step"] for r in rows}
    name = {(r["model"], r["experts"]): (r["model"] if r["experts"] == "none" else f"{r['model']}_{r['experts']}")
            for r in rows}
    headline = {"aten_ops_per_step": {name[k]: v for k, v in by.items()},
                "host_syncs_cuda_per_step": {name[(r["model"], r["experts"])]: r["host_syncs_cuda_per_step"]
                                             for r in rows},
                "step_ms": {name[(r["model"], r["experts"])]: r["step_s_median"] * 1e3 for r in rows},
                "achieved_tflop_per_s": {name[(r["model"], r["experts"])]: r["achieved_tflop_per_s"] for r in rows},
                "batch_size": args.batch_size, "seq_len": 256}
    for m in ("moe", "knowledge"):
        if (m, "loop") in by and (m, "batched") in by:
            headline[f"{m}_loop_over_batched"] = by[(m, "loop")] / by[(m, "batched")]
    if ("dense", "none") in by:
        for m in ("moe", "knowledge"):
            if (m, "batched") in by:
                headline[f"{m}_batched_over_dense"] = by[(m, "batched")] / by[("dense", "none")]
        if ("knowledge_dense", "none") in by:
            headline["knowledge_dense_over_dense"] = by[("knowledge_dense", "none")] / by[("dense", "none")]
    experts_of = {(r["model"], r["experts"]): r for r in rows}
    headline["step_ms_over_dense"] = {name[k]: r["step_s_median"] / experts_of[("dense", "none")]["step_s_median"]
                                      for k, r in experts_of.items() if ("dense", "none") in experts_of}
    return write_result(out, {"device": args.device, "config": vars(args), "runs": rows, "headline": headline},
                        argv=argv, device=args.device)


if __name__ == "__main__":
    main()
