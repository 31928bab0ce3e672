"""Shard placement under Ray (issue 20): a real Ray cluster on this machine serving one table
whose shards live where the cluster config says (a fractional GPU through num_gpus, or
pinned host memory), `kstore status` showing each shard's device and memory, and a hot swap
and a scale while model-worker-like clients keep calling.

    python -m benchmarks.ray_placement --device cuda                        # 16M x 1024 bf16, ~3-4 min
    python -m benchmarks.ray_placement --device cuda --rows 4M --scale-shards 6
    python -m benchmarks.ray_placement --device cpu --rows 4096 --d-v 32 --d-k 16 \\
        --placement host,host --scale-shards 3 --out /tmp/rp.json          # the CPU smoke run

The path is the user's: a version is published as `StoreCluster.start` publishes one
(Table.create, streamed creation, then a snapshot), the shard actors are started by
`StoreCluster.start` with a ClusterConfig whose `shard_overrides` place each shard (what
`kstore up --config` does), `kstore status` runs as a command line in a second process
against the cluster, and the swap and scale are `StoreCluster.swap` / `.scale` (what
`kstore admin swap` and `kstore scale` call). Ray runs embedded in this process with a temp
directory of its own, no dashboard and a small object store (rows never go through it).

Client load: threads, each with its own FollowingTable (the model worker's table), calling
search (k 32) then fetch of the found rows, plus a fetch of fixed probe rows that must equal
one version's values wholly (else counted as a mixed answer). Every exception is a failed call.
The swaps go to an edited version (the probe rows changed by one step, published as a
delta over the base), then to the base and to the edited one again. A scale re-partitions the whole table
through disk (a full new version), so it is skipped, and says why, when the disk lacks room
for a second copy (16M rows: 34 GB, on a 64 GB disk).
Writes benchmarks/results/ray_placement.json (--out).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # `python benchmarks/ray_placement.py` as well as `python -m`
    sys.path.insert(0, REPO)

from benchmarks.common import write_result  # noqa: E402
from benchmarks.scale_phases import dir_bytes, parse_rows  # noqa: E402

OUT = os.path.join(REPO, "benchmarks", "results", "ray_placement.json")
K = 32


def log(msg: str) -> None:
    print(f"[ray_placement {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_placement(spec: str) -> list[dict]:
    """'gpu:0.25,gpu:0.25,host,host' -> [{"rows": "gpu", "num_gpus": 0.25}, ..., {"rows": "host"}]."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part == "host":
            out.append({"rows": "host"})
        elif part.startswith("gpu"):
            frac = float(part.split(":", 1)[1]) if ":" in part else 0.5
            if not 0 < frac <= 1:
                raise argparse.ArgumentTypeError(f"a GPU fraction is in (0, 1], got {part!r}")
            out.append({"rows": "gpu", "num_gpus": frac})
        else:
            raise argparse.ArgumentTypeError(f"placement entries are 'gpu[:fraction]' or 'host', got {part!r}")
    if not out:
        raise argparse.ArgumentTypeError("no shards in the placement")
    return out


def cluster_config(store_root: str, placement: list[dict]):
    """Shards not named in the placement (a scale beyond it) keep their rows in host memory."""
    from cluster.config import ClusterConfig, ShardResources
    overrides = {str(i): p for i, p in enumerate(placement) if p["rows"] == "gpu"}
    return ClusterConfig(store_root=store_root, num_shards=len(placement),
                         shard=ShardResources(num_cpus=0.5, rows="host"), shard_overrides=overrides)


def expected_place(cfg, shard: int) -> str:
    return cfg.shard_resources(shard).rows


def check_devices(status: dict, cfg, cuda: bool) -> list[dict]:
    """Each shard's reported device against its configured placement -> rows of the table
    [{shard, placement, device, pinned, gpu_ids, value_bytes, optimizer_bytes, ...}];
    raises on a mismatch."""
    rows = []
    for s in status["shards"]:
        mem = s["memory"] or {}
        if "error" in mem or "device" not in mem:
            raise RuntimeError(f"shard {s['shard']}: no memory report ({mem})")
        place = expected_place(cfg, s["shard"])
        ok = (mem["device"].startswith("cuda") and len(mem["gpu_ids"]) == 1) if place == "gpu" else \
            (mem["device"] == "cpu" and mem["pinned"] == cuda)
        if not ok:
            raise RuntimeError(f"shard {s['shard']} is configured for {place} rows but reports {mem}")
        rows.append({"shard": s["shard"], "placement": place, "device": mem["device"], "pinned": mem["pinned"],
                     "gpu_ids": mem["gpu_ids"], "rows": mem["rows"], "row_range": s["rows"],
                     "value_bytes": mem["value_bytes"], "key_bytes": mem["key_bytes"],
                     "optimizer": mem["optimizer"], "optimizer_bytes": mem["optimizer_bytes"],
                     "version": s["version"], "healthy": s["healthy"]})
    return rows


def machine_memory() -> dict:
    """Machine-wide memory in use (GB): the GPU's (every process; this one's CUDA context too)
    and the host's (MemTotal - MemAvailable: page cache not counted)."""
    out = {}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["gpu_used_gb"], out["gpu_total_gb"] = (total - free) / 1e9, total / 1e9
    try:
        with open("/proc/meminfo") as f:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in f}
        out["host_used_gb"] = (kb["MemTotal"] - kb["MemAvailable"]) * 1024 / 1e9
        out["host_total_gb"] = kb["MemTotal"] * 1024 / 1e9
    except (OSError, KeyError, ValueError):
        pass
    return out


def cli_status(store_root: str, cfg, ray_address: str, workdir: str) -> dict:
    """`kstore status` in a second process, against this cluster (a state file as `kstore up`
    writes, naming the Ray address): the JSON it prints."""
    from dataclasses import replace
    state = os.path.join(workdir, "cluster.json")
    with open(state, "w") as f:
        json.dump({"cluster": replace(cfg, ray_address=ray_address).to_dict(), "ray_head": None}, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--state", state, "status"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"kstore status exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


class Load:
    """Client threads (search then fetch of the found rows, and a probe fetch checked against
    the allowed versions' values) until stopped; counts per phase."""

    def __init__(self, cluster, queries: torch.Tensor, probe: torch.Tensor, threads: int):
        self.cluster, self.queries, self.probe = cluster, queries, probe
        self.allowed: list[torch.Tensor] = []
        self.counts = {"calls": 0, "failed": 0, "mixed": 0, "rows_fetched": 0}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def set_allowed(self, values: list[torch.Tensor]) -> None:
        with self._lock:
            self.allowed = list(values)

    def _one(self, table) -> tuple[int, bool]:
        res = table.search(self.queries, K)
        ids = res.ids[res.ids >= 0].unique()
        table.fetch(ids)
        with self._lock:
            allowed = self.allowed   # what a fetch starting now may return (narrowed once a swap is done)
        got = table.fetch(self.probe)
        with self._lock:
            allowed = allowed + self.allowed
        return ids.numel() + self.probe.numel(), not any(torch.equal(got, a) for a in allowed)

    def _run(self) -> None:
        table = self.cluster.table()
        try:
            while not self._stop.is_set():
                try:
                    n, mixed = self._one(table)
                    with self._lock:
                        self.counts["calls"] += 1
                        self.counts["mixed"] += int(mixed)
                        self.counts["rows_fetched"] += n
                except Exception as e:  # noqa: BLE001 - a failed call is what is measured
                    with self._lock:
                        self.counts["failed"] += 1
                        self.errors.append(repr(e)[:300])
                    time.sleep(0.05)
        finally:
            table.close()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts, t=time.perf_counter())

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def during(load: Load, fn) -> tuple[float, object, dict]:
    """Run fn under the load -> (seconds, its result, the calls made meanwhile)."""
    a = load.snapshot()
    t0 = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t0
    b = load.snapshot()
    d = {k: b[k] - a[k] for k in ("calls", "failed", "mixed", "rows_fetched")}
    d["qps"] = d["calls"] / max(b["t"] - a["t"], 1e-9)
    return sec, out, d


def publish(args, store_root: str, device: str) -> dict:
    """The table's first version, as StoreCluster.start makes one: Table.create (streamed
    creation onto `device`), then a snapshot."""
    from store_service.config import TableConfig
    from store_service.table import Table
    tcfg = TableConfig(d_k=args.d_k, d_v=args.d_v, segments=[("product", args.n_sub)], value_dtype="bfloat16",
                       store_codebooks=True, num_shards=len(args.placement), device=device, bias_step=0.0, seed=0)
    t0 = time.perf_counter()
    table = Table.create(tcfg, store_root)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    create_s = time.perf_counter() - t0
    opt = table.shards[0].memory()["optimizer"]
    log(f"created {tcfg.num_rows:,} rows on {device} in {create_s:.1f} s (optimizer {opt}); snapshot ...")
    t0 = time.perf_counter()
    version = table.snapshot()
    snapshot_s = time.perf_counter() - t0
    table.close()
    del table
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()   # the shard actors need the GPU memory, not this process
    vbytes = dir_bytes(os.path.join(store_root))
    log(f"published version {version} ({vbytes / 1e9:.1f} GB) in {snapshot_s:.1f} s")
    return {"version": version, "create_s": create_s, "snapshot_s": snapshot_s, "version_bytes": vbytes,
            "optimizer": opt, "rows": tcfg.num_rows}


def edit_version(cluster, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One step that changes the probe rows, published as a delta: (before, after, version)."""
    table = cluster.table()
    try:
        before = table.fetch(probe)
        d_v = table.info().d_v
        table.accumulate_value_grads(probe, torch.ones(probe.numel(), d_v), request_id="ray-placement-edit")
        table.end_step(table.info().step)
        after = table.fetch(probe)
        if torch.equal(before, after):
            raise RuntimeError("the edit step changed no probe row")
        return before, after, table.snapshot()
    finally:
        table.close()


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run(args, result: dict) -> dict:
    import ray

    from cluster.launch import StoreCluster
    from cluster.registry import NAMESPACE
    cuda = torch.cuda.is_available()
    device = args.device
    if device.startswith("cuda") and not cuda:
        raise SystemExit("--device cuda but CUDA is not available here")
    if any(p["rows"] == "gpu" for p in args.placement) and not cuda:
        raise SystemExit("a 'gpu' placement needs CUDA; on this machine use --placement host,host")
    work = tempfile.mkdtemp(prefix="kr-", dir="/tmp")   # short: Ray's socket paths live under it
    store_root = args.store_root or os.path.join(work, "store")
    os.makedirs(store_root, exist_ok=True)
    result.update({"device": f"cuda: {torch.cuda.get_device_name()}" if device.startswith("cuda") else "cpu",
                    "rows": None, "d_k": args.d_k, "d_v": args.d_v, "value_dtype": "bfloat16",
                    "placement_flag": args.placement_spec, "client_threads": args.clients, "k": K,
                    "queries_per_call": args.queries, "probe_rows": args.probe_rows})
    # the shard actors import the project from here, whatever the working directory
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    cluster = None
    try:
        result["publish"] = publish(args, store_root, device)
        result["rows"] = result["publish"]["rows"]
        t0 = time.perf_counter()
        ray.init(namespace=NAMESPACE, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 num_cpus=args.ray_cpus, num_gpus=torch.cuda.device_count() if cuda else 0,
                 object_store_memory=args.object_store_mb * 2 ** 20,
                 _temp_dir=os.path.join(work, "ray"))
        result["ray"] = {"version": ray.__version__, "init_s": time.perf_counter() - t0,
                         "resources": ray.cluster_resources()}
        log(f"Ray {ray.__version__} up: {result['ray']['resources']}")
        cfg = cluster_config(store_root, args.placement)
        t0 = time.perf_counter()
        cluster = StoreCluster.start(cfg)
        result["start_s"] = time.perf_counter() - t0
        log(f"{len(args.placement)} shard actors serving in {result['start_s']:.1f} s")
        status = cluster.status()
        result["shards"] = check_devices(status, cfg, cuda)
        result["memory_serving"] = machine_memory()
        log(f"machine memory in use: {result['memory_serving']}")
        for s in result["shards"]:
            log(f"  shard {s['shard']}: {s['placement']} -> {s['device']} (pinned {s['pinned']}, GPUs "
                f"{s['gpu_ids']}) {s['rows']:,} rows, values {s['value_bytes'] / 1e9:.2f} GB, "
                f"optimizer {s['optimizer_bytes'] / 1e6:.1f} MB")
        if args.cli_status:
            t0 = time.perf_counter()
            try:   # recorded, not fatal: the run goes on to the swaps and the scale
                cli = cli_status(store_root, cfg, ray.get_runtime_context().gcs_address, work)
                result["kstore_status"] = {"seconds": time.perf_counter() - t0, "output": cli,
                                           "shards": check_devices(cli, cfg, cuda)}
                log(f"`kstore status` (second process) agrees: devices "
                    f"{[s['device'] for s in result['kstore_status']['shards']]}")
            except Exception as e:  # noqa: BLE001
                result["kstore_status"] = {"error": repr(e)[:2000]}
                log(f"`kstore status` failed: {e!r}"[:500])

        g = torch.Generator().manual_seed(1)
        probe = torch.randperm(result["rows"], generator=g)[:args.probe_rows].sort().values
        queries = torch.nn.functional.normalize(torch.randn(args.queries, args.d_k, generator=g), dim=-1)
        before, after, edited = edit_version(cluster, probe)
        base = result["publish"]["version"]
        log(f"edited version {edited} (a delta over {base}: {probe.numel()} probe rows changed)")

        phases: dict = {}
        result["phases"] = phases
        with Load(cluster, queries, probe, args.clients) as load:
            result["errors"] = load.errors   # live: kept if the run stops early (trimmed when written)
            load.set_allowed([after])
            phases["steady"] = during(load, lambda: time.sleep(args.seconds))[2]
            log(f"steady: {phases['steady']['qps']:.1f} calls/s from {args.clients} threads")
            swaps = []
            # First onto the edited version (the values the shards serve already): the serving
            # states still carry the base version's number after the edit and the snapshot
            # (Table.snapshot does not relabel them), and a swap onto the number a shard serves
            # under can mix answers (two states, one number: STORE_NOTES "Ray placement on the
            # GPU"). Then base and edited again: each swap changes the probe rows' values.
            for target, allowed_after in ((edited, after), (base, before), (edited, after)):
                load.set_allowed([before, after])
                sec, serving, d = during(load, lambda t=target: cluster.swap(t))
                load.set_allowed([allowed_after])
                d2 = during(load, lambda: time.sleep(args.settle_s))[2]   # after the swap: only its version
                swaps.append({"to_version": target, "serving": serving, "seconds": sec, "during": d, "after": d2})
                log(f"swap to version {target}: {sec:.1f} s, {d['calls']} calls during "
                    f"({d['failed']} failed, {d['mixed']} mixed), then {d2['calls']} calls ({d2['mixed']} mixed)")
                phases["swaps"] = swaps   # kept as they come: a later failure still reports these
            # the swaps loaded versions written by other tables (the base: this process, on --device):
            # every shard must still be where its config put it (host rows pinned where CUDA exists)
            result["shards_after_swaps"] = check_devices(cluster.status(), cfg, cuda)
            log(f"after the swaps: devices {[s['device'] for s in result['shards_after_swaps']]}, pinned "
                f"{[s['pinned'] for s in result['shards_after_swaps']]}")
            try:   # recorded, not fatal: the swaps' figures are kept
                phases["scale"] = scale(args, cluster, load, store_root, base, cuda)
            except Exception as e:  # noqa: BLE001
                phases["scale"] = {"error": repr(e)[:2000]}
                log(f"scale failed: {e!r}"[:500])
            if "seconds" in phases["scale"]:
                phases["steady_after"] = during(load, lambda: time.sleep(args.seconds))[2]
        result["final_status"] = cluster.status()
    finally:
        if cluster is not None:
            cluster.stop()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return result


def scale(args, cluster, load: Load, store_root: str, base: int, cuda: bool) -> dict:
    """Re-partition onto --scale-shards actors under the load, when the disk has room for the
    new full version; the new layout's devices are checked as the first's."""
    if not args.scale_shards:
        return {"skipped": "--scale-shards 0"}
    from store_service import persistence
    need = dir_bytes(persistence.version_path(store_root, base))
    free = shutil.disk_usage(store_root).free
    if free < 1.1 * need:
        log(f"scale skipped: a re-partitioned version needs {need / 1e9:.1f} GB, the disk has {free / 1e9:.1f} GB")
        return {"skipped": f"re-partitioning writes a full version ({need / 1e9:.1f} GB); the disk has "
                           f"{free / 1e9:.1f} GB free", "need_bytes": need, "free_bytes": free}
    sec, version, d = during(load, lambda: cluster.scale(args.scale_shards, drain_s=args.drain_s))
    d2 = during(load, lambda: time.sleep(args.settle_s))[2]
    shards = check_devices(cluster.status(), cluster.config, cuda)
    log(f"scale to {args.scale_shards} shards (version {version}): {sec:.1f} s, {d['calls']} calls during "
        f"({d['failed']} failed, {d['mixed']} mixed); devices {[s['device'] for s in shards]}")
    return {"to_shards": args.scale_shards, "version": version, "seconds": sec, "during": d, "after": d2,
            "shards": shards}


def headline(result: dict) -> dict:
    ph = result["phases"]
    sc = ph["scale"]
    windows = [w["during"] for w in ph["swaps"]] + [w["after"] for w in ph["swaps"]] + [ph["steady"]]
    if "seconds" in sc:
        windows += [sc["during"], sc["after"], ph["steady_after"]]
    return {
        "rows": result["rows"],
        "shards": [{k: s[k] for k in ("placement", "device", "pinned", "rows", "value_bytes", "optimizer_bytes")}
                   for s in result["shards"]],
        "status_devices_match_placement": True,   # check_devices raised otherwise (after the swaps too)
        "devices_after_swaps": [s["device"] for s in result["shards_after_swaps"]],
        "pinned_after_swaps": [s["pinned"] for s in result["shards_after_swaps"]],
        "machine_memory_serving": result["memory_serving"],
        "create_s": result["publish"]["create_s"],
        "publish_snapshot_s": result["publish"]["snapshot_s"],
        "start_s": result["start_s"],
        "swap_s": stats([w["seconds"] for w in ph["swaps"]]),
        "scale_s": sc.get("seconds"),
        "scale_skipped": sc.get("skipped"),
        "scale_error": sc.get("error"),
        "kstore_status_ok": "shards" in result.get("kstore_status", {}),
        "scaled_shards": [{k: s[k] for k in ("placement", "device", "rows")} for s in sc.get("shards", [])],
        "calls": sum(w["calls"] for w in windows),
        "failed_calls": sum(w["failed"] for w in windows),
        "mixed_answers": sum(w["mixed"] for w in windows),
        "qps_steady": ph["steady"]["qps"],
        "qps_during_swap": stats([w["during"]["qps"] for w in ph["swaps"]]),
        "qps_during_scale": sc["during"]["qps"] if "during" in sc else None,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the first version is created (this process); the shards go where --placement says")
    ap.add_argument("--rows", default="16M", help="product rows n_sub^2, as scale_bench reads it (16M: n_sub 4096; 4M; 4096: n_sub 64)")
    ap.add_argument("--d-v", type=int, default=1024)
    ap.add_argument("--d-k", type=int, default=256)
    ap.add_argument("--placement", dest="placement_spec", default="gpu:0.25,gpu:0.25,host,host",
                    help="one entry per shard: gpu[:fraction of a GPU] or host (default %(default)s; the "
                         "fractions leave room for a scale's new actors beside the old ones)")
    ap.add_argument("--scale-shards", type=int, default=6, help="shards after the scale (0: no scale); shards "
                                                                "beyond --placement keep host rows")
    ap.add_argument("--clients", type=int, default=4, help="client threads")
    ap.add_argument("--queries", type=int, default=256, help="queries per search call")
    ap.add_argument("--probe-rows", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0, help="steady load window")
    ap.add_argument("--settle-s", type=float, default=2.0, help="load window after each swap / the scale")
    ap.add_argument("--drain-s", type=float, default=2.0, help="the scale's drain before old actors stop")
    ap.add_argument("--ray-cpus", type=int, default=max(os.cpu_count() or 4, 8))
    ap.add_argument("--object-store-mb", type=int, default=256)
    ap.add_argument("--no-cli-status", dest="cli_status", action="store_false",
                    help="skip `kstore status` in a second process")
    ap.add_argument("--store-root", default="", help="default: a temp dir (removed at the end)")
    ap.add_argument("--out", default=OUT)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.placement = parse_placement(args.placement_spec)
    args.n_sub = parse_rows(args.rows)[1]     # product rows: n_sub^2 (16M: 4096^2)
    result: dict = {}
    try:
        run(args, result)
    except Exception:  # noqa: BLE001 - a GPU run is one shot: what was measured is written, then it fails
        result["error"] = traceback.format_exc()[-6000:]
        log("failed:\n" + result["error"])
    result["errors"] = result.get("errors", [])[:10]
    try:
        result["headline"] = headline(result)
    except Exception:  # noqa: BLE001 - a run that stopped early has a partial result
        result["headline"] = {"error": (result.get("error") or traceback.format_exc())[-600:],
                              "rows": result.get("rows"), "shards": result.get("shards")}
    written = write_result(args.out, result, argv=sys.argv[1:] if argv is None else argv, device=args.device)
    if "error" in result:
        raise SystemExit(f"ray_placement failed; what it measured is in {args.out}")
    return written


if __name__ == "__main__":
    main()
