"""Fetch (and pushdown readout) throughput of each bulk data path (store_service/transport)
against the gRPC path and the in-process shard: one shard server process on this host holding
--rows rows of 1024 bfloat16, fetches of 1k / 10k / 100k distinct rows.

    python benchmarks/transport_bench.py                           # CPU: grpc, shm, torch_dist (gloo)
    python benchmarks/transport_bench.py --device cuda --kinds grpc,shm,cuda_ipc   # rows on the GPU

Per (path, size): median wall ms of --reps fetches (min and max beside it) and GB/s of the
rows' bytes at the median. The client's result is on the CPU (grpc, shm, torch_dist) or the
GPU (cuda_ipc). Writes benchmarks/results/transport_bench_<device>.json (+ .png). Meant to be
folded into benchmarks/wire_bench.py, which owns issue 21's headline.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.capacity_report import provenance  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from store_service.client import RemoteShard  # noqa: E402
from store_service.config import TableConfig  # noqa: E402
from store_service.serve import start_shard_process  # noqa: E402
from store_service.shard import Shard  # noqa: E402
from store_service.table import Table  # noqa: E402
from store_service.transport.client import BulkPath  # noqa: E402
from store_service.transport.config import ClientConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "transport-bench"
D_V = 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(call, reps: int, device: str) -> dict:
    call()   # warm: first-touch of the staging buffer, allocator, connections
    ms = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": reps}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="where the shard keeps its rows")
    ap.add_argument("--rows", type=int, default=120_000, help="rows in the table (>= the largest fetch)")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--kinds", default="grpc,shm,torch_dist")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--buffer-mb", type=int, default=256)
    ap.add_argument("--client-device", default="cpu", help="where shm results land (cuda: pinned, straight to the GPU)")
    ap.add_argument("--torch-threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    ap.add_argument("--readout-tokens", type=int, default=4096, help="tokens of the pushdown readout (k 32)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    prov = provenance(args.device)   # taken before anything runs: the code measured is this commit's
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    cfg = TableConfig(d_k=16, d_v=D_V, segments=[("flat", args.rows)], value_dtype="bfloat16", seed=0)
    client_cfg = ClientConfig(buffer_bytes=args.buffer_mb << 20, slots=4, timeout_s=300, device=args.client_device)
    result = {"config": {"rows": args.rows, "d_v": D_V, "value_dtype": "bfloat16", "sizes": sizes, "kinds": kinds,
                         "reps": args.reps, "readout_tokens": args.readout_tokens, "buffer_mb": args.buffer_mb, "slots": client_cfg.slots,
                         "server_device": args.device, "client_device_shm": args.client_device, "torch_threads_client": torch.get_num_threads()},
              "fetch": {}, "readout": {}}
    with tempfile.TemporaryDirectory() as root:
        version = Table.create(cfg, root).snapshot()
        local = Shard.load(root, version, 0, device=args.device)
        extra = ["--device", args.device] + (["--torch-threads", str(args.torch_threads)] if args.torch_threads else [])
        proc = start_shard_process(root, version, 0, admin_token=TOKEN, extra_args=extra)
        remote = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=300)
        paths = {k: BulkPath.open(proc.address, TOKEN, k, client_cfg) for k in kinds if k != "grpc"}
        calls = {"in_process": local, "grpc": remote, **paths}
        g = torch.Generator().manual_seed(0)
        try:
            for m in sizes:
                ids = torch.randperm(args.rows, generator=g)[:m]
                for name, target in calls.items():
                    ref = local.fetch(ids.to(local.device)).cpu()
                    got = target.fetch(ids.to(local.device) if name == "in_process" else ids)
                    assert torch.equal(got.cpu().view(torch.uint8), ref.view(torch.uint8)), name
                    stats = _timed(lambda: target.fetch(ids.to(local.device) if name == "in_process" else ids),
                                   args.reps, args.device)
                    stats["gbps"] = m * D_V * 2 / stats["median_ms"] / 1e6
                    result["fetch"].setdefault(name, {})[str(m)] = stats
                    print(f"fetch {m:>7} rows {name:>10}: {stats['median_ms']:9.2f} ms  {stats['gbps']:6.2f} GB/s",
                          flush=True)
            t = args.readout_tokens
            ids = torch.randint(0, args.rows, (t, 32), generator=g)
            w = torch.softmax(torch.randn(t, 32, generator=g), -1)
            for name, target in calls.items():
                call = (lambda t=target: t.readout(ids.to(local.device), w.to(local.device))) if name == "in_process" \
                    else (lambda t=target: t.readout(ids, w))
                stats = _timed(call, args.reps, args.device)
                stats["gbps"] = t * D_V * 4 / stats["median_ms"] / 1e6
                result["readout"][name] = stats
                print(f"readout {t}x32 {name:>10}: {stats['median_ms']:9.2f} ms  {stats['gbps']:6.2f} GB/s", flush=True)
        finally:
            for p in paths.values():
                p.close()
            remote.close()
            proc.stop()
    top = str(max(sizes))
    result["headline"] = {f"fetch_gbps_{name}_{top}": round(result["fetch"][name][top]["gbps"], 3)
                          for name in calls}
    result["headline"].update({f"readout_gbps_{name}": round(result["readout"][name]["gbps"], 3) for name in calls})
    result["provenance"] = prov
    # This machine may be shared: its load says how far the absolute figures can be trusted.
    result["provenance"]["loadavg_1_5_15"] = list(os.getloadavg())
    out = args.out or str(RESULTS / f"transport_bench_{args.device.split(':')[0]}.json")
    write_results(result, out, _plot)
    return result


def _plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_size in result["fetch"].items():
        xs = [int(s) for s in by_size]
        ax.plot(xs, [by_size[s]["gbps"] for s in by_size], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distinct rows fetched (1024 bfloat16 each)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title(f"fetch throughput per path, shard on {result['config']['server_device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
