"""In-process table vs the same table over gRPC loopback: latency, throughput, bytes on the wire.

    python -m benchmarks.store_bench            # the issue-2 size (2^20 product rows + 65,536 flat rows)
    python -m benchmarks.store_bench --small    # a quick run on a small table

Table: 2^20 product-key rows (n = 1024, the store holding the codebooks) plus a
flat segment of 65,536 rows; d_k 128, d_v 512 (fp32), 3 shards. Workload: a
batch of 1024 queries, top-32 search, then a pushdown readout of the found
rows with softmax weights. The in-process path is `Table.open` over `Shard`s;
the gRPC path is `connect()` over three `python -m store_service.serve`
processes on 127.0.0.1, serving the same published version. Bytes on the wire
are the serialized request + response messages of every RPC of one call,
counted by a client interceptor in a separate, untimed pass, per token, for
pushdown readout vs fetching the k value rows.

Writes benchmarks/results/store_bench.json (and .png).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

# The shard server processes sleep idle OpenMP threads (start_shard_process);
# the in-process side gets the same setting, before torch loads, so the two
# paths are compared on equal terms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from model_worker.progress import progress_bar  # noqa: E402

from benchmarks.common import ByteCounter, cpu_model, provenance  # noqa: E402
from store_service import persistence  # noqa: E402
from store_service.client import connect  # noqa: E402
from store_service.config import OptimizerConfig, TableConfig  # noqa: E402
from store_service.serve import start_shard_process  # noqa: E402
from store_service.table import Table  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOKEN = "bench-token"


@dataclass
class Size:
    n_sub: int
    flat_rows: int
    d_k: int
    d_v: int
    k: int
    batch: int
    shards: int = 3


FULL = Size(n_sub=1024, flat_rows=65_536, d_k=128, d_v=512, k=32, batch=1024)
SMALL = Size(n_sub=64, flat_rows=4096, d_k=64, d_v=128, k=16, batch=128)


def device_string() -> str:
    cpu = cpu_model()
    return f"{platform.system()} {platform.machine()}, {cpu}, cpu, {os.cpu_count()} cores, torch {torch.__version__}"


def _time(fn, iters: int, warmup: int, label: str) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in progress_bar(range(iters), desc=label, leave=False):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]  # noqa: E731
    return {"p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * p(0.99), "mean_ms": 1e3 * statistics.fmean(times),
            "min_ms": 1e3 * times[0], "iters": iters}


def _workload(table: Table, size: Size, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(size.batch, size.d_k, generator=gen), dim=-1) * 4
    res = table.search(queries, size.k)
    weights = torch.softmax(res.scores.masked_fill(res.ids < 0, float("-inf")), -1)
    return queries, res.ids, weights


def measure(table: Table, size: Size, iters: int, warmup: int, label: str) -> dict:
    queries, ids, weights = _workload(table, size)
    out = {}
    out["search"] = _time(lambda: table.search(queries, size.k), iters, warmup, f"{label} search")
    out["readout"] = _time(lambda: table.readout(ids, weights), iters, warmup, f"{label} readout")
    out["fetch"] = _time(lambda: table.fetch(ids.reshape(-1)), max(3, iters // 2), 1, f"{label} fetch")
    for name in ("search", "readout", "fetch"):
        out[name]["tokens_per_s"] = size.batch / (out[name]["p50_ms"] / 1e3)
    return out


def run(size: Size, iters: int, warmup: int, store_root: str, server_threads: int) -> dict:
    load_start = os.getloadavg()[0]
    stages = progress_bar(total=5, desc="store_bench", unit="stage")
    cfg = TableConfig(d_k=size.d_k, d_v=size.d_v, segments=[("product", size.n_sub), ("flat", size.flat_rows)],
                      store_codebooks=True, num_shards=size.shards, bias_step=0.0,
                      optimizer=OptimizerConfig("sgd", lr=0.0))
    t0 = time.perf_counter()
    version = persistence.latest_version(store_root)
    if version is None or persistence.load_config(store_root, version).to_dict() != cfg.to_dict():
        table = Table.create(cfg, store_root)  # publish once; a kept --store-root is reused
        version = table.snapshot()
        del table
        gc.collect()
    build_s = time.perf_counter() - t0
    stages.update()

    # In-process, two ways: the Table's default for Shards (called in turn) and with its thread pool.
    stages.set_postfix_str("in-process")
    local = Table.open(store_root, version)
    inproc_seq = measure(local, size, iters, warmup, "in-process")
    expect = _workload(local, size)
    local.close()
    local = Table(local.shards, parallel=True)
    inproc_par = measure(local, size, iters, warmup, "in-process, threads")
    local.close()
    del local
    gc.collect()
    # The ratio is taken against the faster in-process variant of each operation.
    inproc = {op: min(inproc_seq[op], inproc_par[op], key=lambda r: r["p50_ms"]) for op in inproc_seq}
    stages.update()

    procs = []
    try:
        stages.set_postfix_str("starting servers")
        extra = ["--torch-threads", str(server_threads)] if server_threads else []
        for i in range(size.shards):
            procs.append(start_shard_process(store_root, version, i, admin_token=TOKEN, extra_args=extra,
                                             startup_timeout_s=300))
        counter = ByteCounter()
        remote = connect([p.address for p in procs], admin_token=TOKEN, timeout_s=120, interceptors=[counter])
        stages.update()
        # Same answers before timing anything.
        got = _workload(remote, size)
        assert torch.equal(got[1], expect[1]), "gRPC search disagrees with in-process"
        stages.set_postfix_str("gRPC")
        grpc_res = measure(remote, size, iters, warmup, "gRPC")
        stages.update()

        queries, ids, weights = expect
        counter.reset()
        counter.enabled = True
        remote.readout(ids, weights)
        pushdown = dict(counter.bytes)
        counter.reset()
        remote.fetch(ids.reshape(-1))
        fetch = dict(counter.bytes)
        counter.reset()
        remote.search(queries, size.k)
        search = dict(counter.bytes)
        counter.enabled = False
        stages.update()
    finally:
        for p in procs:
            p.stop()
        stages.close()

    tokens = size.batch
    wire = {
        "pushdown_bytes_per_token": sum(pushdown.values()) / tokens,
        "fetch_bytes_per_token": sum(fetch.values()) / tokens,
        "search_bytes_per_query": sum(search.values()) / tokens,
        "pushdown_over_fetch": sum(pushdown.values()) / sum(fetch.values()),
        "note": "serialized request + response bytes of every RPC of one call (all shards), / batch",
    }
    ratio = {op: grpc_res[op]["p50_ms"] / inproc[op]["p50_ms"] for op in ("search", "readout", "fetch")}
    ratio_p99 = {op: grpc_res[op]["p99_ms"] / inproc[op]["p99_ms"] for op in ("search", "readout", "fetch")}
    return {
        "device": device_string(),
        "headline": {
            "search_grpc_over_local_p50": ratio["search"],
            "readout_grpc_over_local_p50": ratio["readout"],
            "pushdown_bytes_per_token": wire["pushdown_bytes_per_token"],
            "fetch_bytes_per_token": wire["fetch_bytes_per_token"],
        },
        "target": "gRPC p50 <= 2x in-process p50 for search and readout (pushdown forward)",
        "size": {**asdict(size), "product_rows": size.n_sub ** 2, "num_rows": cfg.num_rows,
                 "value_dtype": cfg.value_dtype},
        "setup": {"in_process": "Table.open over Shard objects in one process; per operation the faster of "
                                "shards called in turn (the Table's default) and its thread pool",
                  "grpc": f"connect() over {size.shards} `python -m store_service.serve` processes on 127.0.0.1, "
                          "calls scattered in parallel by the Table's thread pool",
                  "server_torch_threads": server_threads or "torch default",
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "client_torch_threads": torch.get_num_threads(), "build_and_publish_s": build_s},
        "in_process": inproc,
        "in_process_variants": {"shards_in_turn": inproc_seq, "thread_pool": inproc_par},
        "grpc": grpc_res,
        "grpc_over_local_p50": ratio,
        "grpc_over_local_p99": ratio_p99,
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0],
                            "note": "the machine is shared; a load above its core count inflates every figure"},
        "wire": wire,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = ["search", "readout", "fetch"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(ops))
    for off, key, label in ((-0.2, "in_process", "in-process"), (0.2, "grpc", "gRPC loopback")):
        a.bar([i + off for i in x], [result[key][op]["p50_ms"] for op in ops], width=0.4, label=label,
              yerr=[[0] * 3, [result[key][op]["p99_ms"] - result[key][op]["p50_ms"] for op in ops]], capsize=3)
    a.set_xticks(list(x), ops)
    a.set_ylabel("latency per batch, ms (p50, bar to p99)")
    a.set_title(f"batch {result['size']['batch']}, k {result['size']['k']}, {result['size']['num_rows']:,} rows")
    a.legend()
    w = result["wire"]
    b.bar(["pushdown", "fetch"], [w["pushdown_bytes_per_token"] / 1024, w["fetch_bytes_per_token"] / 1024])
    b.set_ylabel("KiB on the wire per token")
    b.set_title("readout: pushdown vs fetch")
    fig.suptitle(result["device"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small table, for a quick run")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=0, help="torch threads per server (0: default)")
    parser.add_argument("--store-root", default=None, help="where to publish the table (default: a temp dir)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/store_bench[_small].json)")
    args = parser.parse_args()
    size = SMALL if args.small else FULL
    iters = args.iters or (20 if args.small else 10)
    out = args.out or os.path.join(RESULTS, "store_bench_small.json" if args.small else "store_bench.json")
    if args.store_root and os.path.isdir(args.store_root) and os.listdir(args.store_root):
        # a table left there by an earlier call would be measured instead of this call's
        raise SystemExit(f"--store-root {args.store_root} is not empty: give a new or empty directory")
    root = args.store_root or tempfile.mkdtemp(prefix="store_bench_")
    try:
        result = run(size, iters, args.warmup, root, args.server_threads)
    finally:
        if args.store_root is None:
            shutil.rmtree(root, ignore_errors=True)
    result["provenance"] = provenance()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(out)[0] + ".png")
    h = result["headline"]
    print(json.dumps({"device": result["device"], **h}, indent=2))
    print(f"search p50: in-process {result['in_process']['search']['p50_ms']:.1f} ms, "
          f"gRPC {result['grpc']['search']['p50_ms']:.1f} ms; readout p50: in-process "
          f"{result['in_process']['readout']['p50_ms']:.1f} ms, gRPC {result['grpc']['readout']['p50_ms']:.1f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
