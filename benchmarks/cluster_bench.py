"""The store as a Ray cluster: throughput against 1, 2 and 4 shard actors, and
the time to scale and to hot-swap a 1M-row table while clients keep calling.

    python -m benchmarks.cluster_bench           # 2^20 product rows (n 1024), d_k 64, d_v 128
    python -m benchmarks.cluster_bench --small   # 2^14 rows, for a quick look

Workload per call: 256 queries, top-16 search, then a pushdown readout of the
found rows (softmax weights). Throughput: calls/s and queries/s from 2 client
threads for a fixed time. During each swap and scale, 2 client threads keep
calling; every exception counts as a failed call.

Writes benchmarks/results/cluster_bench.json and .png.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time

import torch
from model_worker.progress import progress_bar

from benchmarks.common import write_results
from benchmarks.store_bench import device_string
from cluster.config import ClusterConfig
from cluster.launch import StoreCluster
from store_service.config import OptimizerConfig, TableConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def workload(table, queries: torch.Tensor, k: int) -> None:
    res = table.search(queries, k)
    w = torch.softmax(res.scores.masked_fill(res.ids < 0, float("-inf")), -1).nan_to_num(0.0)
    table.readout(res.ids, w)


class Load:
    """Client threads calling `workload` until stopped; counts calls and failures."""

    def __init__(self, cluster: StoreCluster, queries: torch.Tensor, k: int, threads: int = 2):
        self.cluster, self.queries, self.k = cluster, queries, k
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        table = self.cluster.table()
        try:
            while not self._stop.is_set():
                try:
                    workload(table, self.queries, self.k)
                    with self._lock:
                        self.calls += 1
                except Exception as e:  # noqa: BLE001 - a failed call is what we measure
                    with self._lock:
                        self.failures.append(repr(e)[:200])
        finally:
            table.close()

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--seconds", type=float, default=8.0, help="throughput window per shard count")
    ap.add_argument("--swaps", type=int, default=3, help="hot swaps timed (the headline is their median)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "cluster_bench.json"))
    args = ap.parse_args()

    n_sub = 128 if args.small else 1024
    d_k, d_v, k, batch = 64, 128, 16, 256
    root = tempfile.mkdtemp(prefix="kstore-cluster-bench-")
    tcfg = TableConfig(d_k=d_k, d_v=d_v, segments=[("product", n_sub)], store_codebooks=True,
                       optimizer=OptimizerConfig(kind="sgd", lr=0.1), seed=0)
    queries = torch.randn(batch, d_k, generator=torch.Generator().manual_seed(0))
    result = {"device": device_string(), "rows": n_sub ** 2, "d_k": d_k, "d_v": d_v, "k": k, "batch": batch,
              "client_threads": 2, "throughput": {}, "scale": [], "swap": []}
    cluster = StoreCluster.start(ClusterConfig(store_root=root, num_shards=1), tcfg)
    try:
        for shards in progress_bar((1, 2, 4), desc="throughput vs shards"):
            if cluster.shard_map().num_shards != shards:
                t0 = time.perf_counter()
                with Load(cluster, queries, k) as load:
                    cluster.scale(shards, drain_s=1.0)
                result["scale"].append({"to_shards": shards, "seconds": time.perf_counter() - t0,
                                        "calls_during": load.calls, "failed_calls": len(load.failures),
                                        "failures": load.failures[:5]})
            table = cluster.table()
            workload(table, queries, k)  # warm-up
            table.close()
            with Load(cluster, queries, k) as load:
                time.sleep(args.seconds)
            result["throughput"][str(shards)] = {"calls_per_s": load.calls / args.seconds,
                                                 "queries_per_s": load.calls * batch / args.seconds,
                                                 "failed_calls": len(load.failures)}
        # hot swap of the whole table between two published versions, under load
        table = cluster.table()
        table.set_ablated(torch.arange(0, 1000), True)
        edited = table.snapshot()
        table.close()
        for i in progress_bar(range(args.swaps), desc="hot swap under load"):
            with Load(cluster, queries, k) as load:
                time.sleep(0.5)
                t0 = time.perf_counter()
                cluster.swap(edited)
                seconds = time.perf_counter() - t0
                time.sleep(0.5)
            result["swap"].append({"seconds": seconds, "calls_during": load.calls,
                                   "failed_calls": len(load.failures), "failures": load.failures[:5]})
            edited = cluster.swap(edited, shard=0)  # the next round swaps to a composed version
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    tp = result["throughput"]
    result["headline"] = {
        "failed_calls_during_swap": sum(s["failed_calls"] for s in result["swap"]),
        "failed_calls_during_scale": sum(s["failed_calls"] for s in result["scale"]),
        # the median of the swaps with min and max (never the best one alone)
        "swap_seconds_1m_rows_median": statistics.median(s["seconds"] for s in result["swap"]),
        "swap_seconds_1m_rows_min_max": [min(s["seconds"] for s in result["swap"]),
                                         max(s["seconds"] for s in result["swap"])],
        "swaps": len(result["swap"]),
        "scale_seconds_1m_rows": max(s["seconds"] for s in result["scale"]),
        "throughput_4_over_1_shards": tp["4"]["calls_per_s"] / tp["1"]["calls_per_s"],
    }
    if args.small:
        result["note"] = "--small run: the table has 2^14 rows, not 1M"
    write_results(result, args.out, _plot)


def _plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    shards = sorted(result["throughput"], key=int)
    a.bar(shards, [result["throughput"][s]["queries_per_s"] for s in shards])
    a.set_xlabel("shard actors")
    a.set_ylabel("queries/s (search + pushdown readout)")
    a.set_title(f"{result['rows']:,} rows, {result['device'].split(',')[1].strip()[:30]}")
    ops = [f"scale->{s['to_shards']}" for s in result["scale"]] + [f"swap {i}" for i in range(len(result["swap"]))]
    secs = [s["seconds"] for s in result["scale"]] + [s["seconds"] for s in result["swap"]]
    fails = [s["failed_calls"] for s in result["scale"]] + [s["failed_calls"] for s in result["swap"]]
    b.bar(ops, secs)
    for i, f in enumerate(fails):
        b.text(i, secs[i], f"{f} failed", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("seconds, under load")
    b.set_title("scale and hot swap")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
