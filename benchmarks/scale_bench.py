"""The store at memory-layer scale (issue 20): creation, optimizer state, persistence against
the disk's own speed, hot swap under load, search and fetch, at 1M / 4M / 16M product rows
(d_v 1024 bf16, one shard) and for a table whose rows live in host memory.

    python -m benchmarks.scale_bench --phases disk,create,optimizer,search,fetch,persist --rows 1M,4M
    python -m benchmarks.scale_bench --phases create,optimizer,search,fetch,persist,swap --rows 16M
    python -m benchmarks.scale_bench --phases host --rows 16M --gpu-cap-gb 16
    python -m benchmarks.scale_bench --phases maxrows --max-rows-try 16M,24M,32M
    python -m benchmarks.scale_bench --device cpu --rows 64k --d-v 128 --out /tmp/s.json   # the CPU smoke run

Each run merges its phases into --out (benchmarks/results/scale_bench.json by default):
phases[<phase>][<rows label>] is replaced, everything else kept, and the headline is
recomputed from all of them, so several GPU commands of under 10 minutes build one result
(`--fresh` starts over). Every run's provenance is kept in `runs`. Phases of other
branches' features (row-wise optimizers, host-memory rows) are skipped with a note where
this checkout lacks them. Measurements: benchmarks/scale_phases.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from benchmarks import scale_phases as ph
from store_service import chunk_io

PHASES = ("disk", "create", "optimizer", "persist", "swap", "search", "fetch", "host", "maxrows")
OUT = "benchmarks/results/scale_bench.json"
OUT_CPU = "benchmarks/results/scale_bench_cpu.json"   # the smoke run's; never mixed with the GPU's


def _provenance(argv: list[str], device: str) -> dict:
    try:
        from benchmarks.common import provenance
        return provenance(argv, device=device)
    except ImportError:   # before benchmarks/common.py had provenance (issue 24)
        import datetime
        import platform
        import subprocess

        from benchmarks.common import cpu_model

        def git(*a):
            return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
        dev = f"cuda: {torch.cuda.get_device_name()}" if device.startswith("cuda") else device
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
                "command": "python -m benchmarks.scale_bench " + " ".join(argv),
                "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                            "platform": platform.platform(), "hostname": platform.node()},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": dev,
                "python": sys.version.split()[0], "torch": torch.__version__}


def _load(out: str, fresh: bool) -> dict:
    if not fresh and os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    return {"phases": {}, "runs": [], "notes": {}}


def _get(result: dict, phase: str, label: str, *path):
    x = result["phases"].get(phase, {}).get(label)
    for p in path:
        if not isinstance(x, dict):
            return None
        x = x.get(p)
    return x


def _largest(result: dict, phase: str) -> str | None:
    labels = result["phases"].get(phase, {})
    rows = {lab: (rec.get("rows") or ph.parse_rows(lab)[1] ** 2) for lab, rec in labels.items()
            if isinstance(rec, dict)}
    return max(rows, key=rows.get) if rows else None


def headline(result: dict) -> dict:
    """The issue's headline from every phase measured so far (None where not yet measured).
    *_16m read the 16M runs; snapshot/load speed the largest size persisted."""
    big = _largest(result, "persist")
    maxrows = result["phases"].get("maxrows", {}).get("all", {}).get("max_rows")
    created = [rec["rows"] for rec in result["phases"].get("create", {}).values() if rec.get("rows")]
    opt_label = _largest(result, "optimizer")
    swaps = [rec for rec in result["phases"].get("swap", {}).values() if isinstance(rec, dict)]
    disk = result["phases"].get("disk", {}).get("all", {})
    return {
        "max_rows_one_gpu": maxrows if maxrows is not None else (max(created) if created else None),
        "create_s_16m": _get(result, "create", "16M", "create_s"),
        "optimizer_bytes_over_values": _get(result, "optimizer", opt_label, "default", "ratio") if opt_label else None,
        "snapshot_gbps": _get(result, "persist", big, "snapshot_gbps") if big else None,
        "load_gbps": _get(result, "persist", big, "load_gbps") if big else None,
        "incremental_snapshot_speedup_1pct": _get(result, "persist", "4M", "incremental", "speedup_1pct"),
        "disk_write_gbps": disk.get("write_gbps"),
        "disk_read_gbps": disk.get("read_gbps"),
        "swap_s_16m": _get(result, "swap", "16M", "swap_s", "median"),
        "swap_failed_calls": sum(r["failed"] + r["mixed"] for r in swaps) if swaps else None,
        "search_qps_16m": _get(result, "search", "16M", "qps"),
        "fetch_rows_per_s_16m": _get(result, "fetch", "16M", "rows_per_s"),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("create", ("create_s",), "create"), ("persist", ("full_snapshot_s", "median"), "snapshot (fsync)"),
              ("persist", ("load_s", "median"), "load (cold)"), ("swap", ("swap_s", "median"), "hot swap"),
              ("host", ("create", "create_s"), "create (host rows)")]
    for phase, path_, name in series:
        pts = sorted((ph.parse_rows(lab)[1] ** 2, _get(result, phase, lab, *path_))
                     for lab in result["phases"].get(phase, {}) if _get(result, phase, lab, *path_) is not None)
        if pts:
            ax_t.plot(*zip(*pts), marker="o", label=name)
    for key, name in (("gpu_now_gb", "GPU allocated after create"), ("gpu_peak_gb", "GPU peak during create"),
                      ("host_peak_gb", "host RSS peak during create")):
        pts = sorted((rec["rows"], rec[key]) for rec in result["phases"].get("create", {}).values() if key in rec)
        if pts:
            ax_m.plot(*zip(*pts), marker="o", label=name)
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows (d_v 1024 bf16)" if result.get("d_v", 1024) == 1024 else f"rows (d_v {result['d_v']})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_t.set_title("time against rows")
    ax_m.set_title("memory against rows")
    fig.suptitle(f"scale_bench on {result.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_size(args, result: dict, label: str, n: int, device: str) -> None:
    phases, rec = args.phases, result["phases"]
    ctx = {"table": None}

    def put(phase, value):
        rec.setdefault(phase, {})[label] = value
        _write(args, result)
    needs_table = [p for p in ("create", "optimizer", "search", "fetch", "persist", "swap") if p in phases]
    if needs_table:
        ctx["table"], made = ph.create(args, n, device)
        if "create" in phases:
            put("create", made)
    for phase in needs_table[1:] if "create" in phases else needs_table:
        print(f"[scale_bench] {label}: {phase}", flush=True)
        if phase == "optimizer":
            put(phase, ph.optimizer(args, ctx["table"], device))
        elif phase == "search":
            put(phase, ph.search(args, ctx["table"], device))
        elif phase == "fetch":
            put(phase, ph.fetch(args, ctx["table"], device))
        elif phase == "persist":
            put(phase, ph.persist(args, ctx, device))
        elif phase == "swap":
            put(phase, ph.swap(args, ctx["table"], device))
    if ctx["table"] is not None:
        ctx["table"].close()
    ctx.clear()
    ph.reset_memory(device)
    shutil.rmtree(ph.table_root(args, n), ignore_errors=True)   # the disk holds one size at a time
    if "host" in phases:
        put("host", _host(args, n, device))


def _host(args, n: int, device: str) -> dict:
    if not ph.host_rows_supported():
        return {"skipped": "this checkout has no host-memory rows (TableConfig.pin_memory, issue 20's r20 branch)"}
    cap = None
    if device.startswith("cuda") and args.gpu_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(1.0, args.gpu_cap_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(cap)
    try:
        table, made = ph.create(args, n, device, host=True)
        ctx = {"table": table}
        out = {"gpu_cap_fraction": cap, "create": made, "optimizer": ph.optimizer_bytes(table),
               "search": ph.search(args, table, device), "fetch": ph.fetch(args, table, device)}
        if "persist" in args.phases or args.host_persist:
            out["persist"] = ph.persist(args, ctx, "cpu")
        ctx["table"].close()
        return out
    finally:
        shutil.rmtree(ph.table_root(args, n, host=True), ignore_errors=True)
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)


def _write(args, result: dict) -> None:
    result["headline"] = headline(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.out.replace(".json", ".png"))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="disk,create,optimizer,search,fetch,persist,swap")
    p.add_argument("--rows", default="1M,4M,16M", help="product rows per table: 64k, 1M, 4M, 16M (n^2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-v", type=int, default=1024)
    p.add_argument("--d-k", type=int, default=128)
    p.add_argument("--optimizer", default=None,
                   help="the tables' optimizer (default: auto, the large-table default, on a GPU; sgd on the CPU)")
    p.add_argument("--io-threads", type=int, default=None, help="chunk files in flight (store_service.chunk_io)")
    p.add_argument("--optimizers", default="sgd,rowwise_adagrad,rowwise_adam",
                   help="kinds the optimizer phase switches to and measures")
    p.add_argument("--repeats", type=int, default=None, help="default 3 on a GPU, 1 on the CPU")
    p.add_argument("--search-batch", type=int, default=None, help=f"default {ph.SEARCH_BATCH} on a GPU, 256 on the CPU")
    p.add_argument("--swap-clients", type=int, default=2, help="fetch + search client thread pairs")
    p.add_argument("--store-root", default=os.environ.get("SCALE_BENCH_STORE", "/tmp/scale_bench_store"))
    p.add_argument("--dd-gb", type=float, default=None, help="size of dd's test file (default 8 on a GPU, 0.25)")
    p.add_argument("--incremental-max", default="4M", help="largest size with incremental / compaction runs")
    p.add_argument("--keep-one-above", default="4M", help="above this, one full version at a time, one copy")
    p.add_argument("--gpu-cap-gb", type=float, default=16.0, help="host phase: GPU memory cap")
    p.add_argument("--host-persist", action="store_true", help="host phase: also snapshot and load")
    p.add_argument("--max-rows-try", default="16M,24M,32M")
    p.add_argument("--out", default=None, help=f"default {OUT} on a GPU, {OUT_CPU} on the CPU")
    p.add_argument("--fresh", action="store_true", help="start a new result instead of merging into --out")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    bad = [x for x in args.phases if x not in PHASES]
    if bad:
        raise SystemExit(f"--phases: unknown {bad}; choose from {PHASES}")
    args.optimizers = [x for x in args.optimizers.split(",") if x]
    args.max_rows_try = [x for x in args.max_rows_try.split(",") if x]
    args.incremental_max = ph.parse_rows(args.incremental_max)[1] ** 2
    args.keep_one_above = ph.parse_rows(args.keep_one_above)[1] ** 2
    device = args.device
    gpu = device.startswith("cuda")
    args.repeats = args.repeats or (3 if gpu else 1)
    args.search_batch = args.search_batch or (ph.SEARCH_BATCH if gpu else 256)
    args.dd_gb = args.dd_gb or (8.0 if gpu else 0.25)
    args.out = args.out or (OUT if gpu else OUT_CPU)
    args.optimizer = args.optimizer or ("auto" if gpu else "sgd")
    if args.io_threads:
        chunk_io.IO.threads = args.io_threads
    result = _load(args.out, args.fresh)
    why = ph.optimizer_kind_ok(args.optimizer)
    args.optimizer_used = None if why else args.optimizer
    if why:
        result["notes"]["optimizer"] = f"{why}; tables use this checkout's default optimizer"
    prov = _provenance(argv, device)
    if result.get("device") not in (None, prov["device"]):
        raise SystemExit(f"{args.out} holds runs on {result['device']}, this run is on {prov['device']}: "
                         "use another --out or --fresh")
    result.update(device=prov["device"], d_v=args.d_v, d_k=args.d_k, provenance=prov, io_threads=chunk_io.IO.threads)
    result["runs"].append({"phases": args.phases, "rows": args.rows, **prov})
    if "disk" in args.phases:
        result["phases"].setdefault("disk", {})["all"] = ph.disk(args)
        _write(args, result)
    for label in [x for x in args.rows.split(",") if x]:
        _, n = ph.parse_rows(label)
        if set(args.phases) - {"disk", "maxrows"}:
            _run_size(args, result, label, n, device)
    if "maxrows" in args.phases:
        result["phases"].setdefault("maxrows", {})["all"] = ph.max_rows(args, device)
    _write(args, result)
    print(json.dumps(result["headline"], indent=2))
    return result


if __name__ == "__main__":
    main()
