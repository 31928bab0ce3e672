"""Pinned-version leases and readout_backward through the data path seam, side by side in one run
(issue 21; store_service/leases.py, benchmarks/TRANSPORT_NOTES.md).

    python benchmarks/lease_bench.py                     # CPU; about 2-3 minutes
    python benchmarks/lease_bench.py --device cuda --kinds shm,cuda_ipc    # rows on the GPU

1. Reads during swaps. One shard server process flips between three versions back to back
   (prepare, flip, release; unpaced) while a reader fetches every row in many pieces, for
   --swap-seconds per arm: through a small staging buffer (shm / cuda_ipc) and over gRPC in
   parts on 4 channels; each without leases (the behaviour before them: ClientConfig.lease off,
   the gRPC path's leases off) and with them. Per arm: reads, failed reads (an error after the
   reader's retries), re-reads (a read started again after StaleVersion or a step between
   pieces), mixed reads (rows of two versions in one answer: a torn read), swaps done.
2. readout_backward: the pushdown backward of --backward-tokens x k --backward-k with d_v 1024
   (grad_out float32, the bulk payload) in process, over gRPC and through each same-host
   transport via the DataPath seam (RemoteShard(data_paths=...)); median wall ms of --reps (an
   end_step between calls, not timed), and the table after them checked bitwise against gRPC's;
   k 1 too, where the shard's work is small and the payload's transport shows.

Writes benchmarks/results/lease_bench_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.capacity_report import provenance  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from store_service import persistence  # noqa: E402
from store_service.client import RemoteShard  # noqa: E402
from store_service.config import OptimizerConfig, TableConfig  # noqa: E402
from store_service.grpc_datapath import WireConfig  # noqa: E402
from store_service.serve import start_shard_process  # noqa: E402
from store_service.shard import Shard  # noqa: E402
from store_service.table import Table  # noqa: E402
from store_service.transport.client import BulkPath  # noqa: E402
from store_service.transport.config import ClientConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "lease-bench"
D_V = 1024


def _publish_shifted(root: str, src: int, dst: int, shift: float) -> None:
    with persistence.staged_version(root, dst) as stage:
        data = persistence.read_shard(persistence.version_path(root, src), 0)
        arrays = dict(data.arrays, values=data.arrays["values"] + shift)
        persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=dst), arrays))
        persistence.finish_version(stage, dst)


def _reader(kind: str, address: str, lease: bool, buffer_bytes: int):
    """(fetch(ids), re-reads so far, close) of one reader."""
    if kind == "grpc":
        remote = RemoteShard(address, admin_token=TOKEN, timeout_s=60,
                             wire_config=WireConfig(channels=4, stream_min_rows=1, split_min_rows=256, chunk_rows=256))
        remote.data_path().leases = lease
        return remote.fetch, lambda: 0, remote.close
    path = BulkPath.open(address, TOKEN, kind, ClientConfig(buffer_bytes=buffer_bytes, slots=4, timeout_s=60,
                                                            lease=lease))
    return path.fetch, lambda: path.rereads, path.close


def swap_arm(root: str, versions: list[int], want: dict, address: str, kind: str, lease: bool,
             seconds: float, buffer_bytes: int) -> dict:
    admin = RemoteShard(address, admin_token=TOKEN, timeout_s=120, store_root=root)
    fetch, rereads, close = _reader(kind, address, lease, buffer_bytes)
    ids = torch.arange(next(iter(want.values())).shape[0])
    stop = threading.Event()
    out = {"reads": 0, "failed": 0, "mixed": 0, "swaps": 0, "read_ms": [], "errors": {}}

    def swap():
        serving = admin.describe().info.version
        while not stop.is_set():
            nxt = versions[(versions.index(serving) + 1) % len(versions)]
            admin.prepare_version(root, nxt)
            admin.flip_version(nxt)
            admin.release_version(serving)
            serving = nxt
            out["swaps"] += 1

    def read():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                got = fetch(ids).cpu()
            except Exception as exc:   # counted: what a caller would see
                out["failed"] += 1
                name = type(exc).__name__
                out["errors"][name] = out["errors"].get(name, 0) + 1
                continue
            out["read_ms"].append((time.perf_counter() - t0) * 1e3)
            out["reads"] += 1
            if not any(torch.equal(got.view(torch.uint8), w) for w in want.values()):
                out["mixed"] += 1
    threads = [threading.Thread(target=swap), threading.Thread(target=read)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    out["rereads"] = rereads()
    ms = out.pop("read_ms")
    out["read_ms_median"] = statistics.median(ms) if ms else None
    out["read_ms_min_max"] = [min(ms), max(ms)] if ms else None
    close()
    admin.close()
    return out


def backward_arms(root: str, version: int, device: str, kinds: list[str], tokens: int, ks: list[int], rows: int,
                  reps: int) -> dict:
    """Per path and k: the backward's median ms (each k's calls on the same server, one after the other)."""
    g = torch.Generator().manual_seed(0)
    calls = {k: (torch.randint(0, rows, (tokens, k), generator=g), torch.softmax(torch.randn(tokens, k, generator=g), -1))
             for k in ks}
    grad_out = torch.randn(tokens, D_V, generator=g)
    out, tables = {}, {}
    for name in ["in_process", "grpc"] + kinds:
        proc = None
        if name == "in_process":
            target = Shard.load(root, version, 0, device=device)
        else:
            proc = start_shard_process(root, version, 0, admin_token=TOKEN,
                                       extra_args=["--device", device, *(["--data-paths", name] if name != "grpc" else [])])
            target = RemoteShard(proc.address, admin_token=TOKEN, timeout_s=300,
                                 data_paths=() if name == "grpc" else (name,))
        try:
            step = 0
            for k, (ids, w) in calls.items():
                ms = []
                for rep in range(reps + 1):   # the first is a warm-up
                    t0 = time.perf_counter()
                    target.readout_backward(ids, w, grad_out, request_id=f"b{step}")
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()   # the in-process call's work is queued on the GPU
                    if rep:
                        ms.append((time.perf_counter() - t0) * 1e3)
                    target.end_step(step)
                    step += 1
                kind = getattr(target, "data_path_kind", "in_process")
                out[f"{name}_k{k}"] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
                                       "reps": reps, "path": kind, "tokens": tokens, "k": k,
                                       "grad_out_mb": grad_out.numel() * 4 / 1e6}
                print(f"readout_backward {tokens}x{k} {name:>10} ({kind}): {statistics.median(ms):9.1f} ms", flush=True)
            tables[name] = target.fetch(torch.arange(rows)).cpu().view(torch.uint8)
        finally:
            if proc is not None:
                target.close()
                proc.stop()
    out["tables_bitwise_grpc"] = {name: bool(torch.equal(t, tables["grpc"])) for name, t in tables.items()}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="where the shard keeps its rows")
    ap.add_argument("--kinds", default="shm", help="same-host transports measured beside gRPC")
    ap.add_argument("--swap-rows", type=int, default=8192, help="rows of the swapped table (d_v 256 float32)")
    ap.add_argument("--swap-buffer-kb", type=int, default=256, help="staging buffer of the swap readers (4 slots)")
    ap.add_argument("--swap-seconds", type=float, default=10.0)
    ap.add_argument("--rows", type=int, default=32768, help="rows of the backward's table (d_v 1024 bfloat16)")
    ap.add_argument("--backward-tokens", type=int, default=4096)
    ap.add_argument("--backward-k", default="8,1", help="slots per token (comma list): 1 leaves little work to "
                                                      "the shard, so the payload's transport shows")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    prov = provenance(args.device)
    kinds = [k for k in args.kinds.split(",") if k]
    result = {"config": vars(args), "swaps": {}, "readout_backward": {}}
    with tempfile.TemporaryDirectory() as root:
        cfg = TableConfig(d_k=8, d_v=256, segments=[("flat", args.swap_rows)], seed=1)
        v1 = Table.create(cfg, root).snapshot()
        versions = [v1, v1 + 1, v1 + 2]
        _publish_shifted(root, v1, v1 + 1, 1000.0)
        _publish_shifted(root, v1, v1 + 2, 2000.0)
        every = torch.arange(args.swap_rows)
        want = {v: Shard.load(root, v, 0).fetch(every).view(torch.uint8) for v in versions}
        proc = start_shard_process(root, v1, 0, admin_token=TOKEN, extra_args=["--device", args.device])
        try:
            for kind in ["grpc"] + kinds:
                for lease in (False, True):
                    arm = swap_arm(root, versions, want, proc.address, kind, lease, args.swap_seconds,
                                   args.swap_buffer_kb << 10)
                    result["swaps"][f"{kind}_{'lease' if lease else 'no_lease'}"] = arm
                    print(f"swaps {kind:>9} lease={lease!s:>5}: {arm}", flush=True)
        finally:
            proc.stop()
    with tempfile.TemporaryDirectory() as root:
        cfg = TableConfig(d_k=16, d_v=D_V, segments=[("flat", args.rows)], value_dtype="bfloat16", seed=0,
                          optimizer=OptimizerConfig("sgd", lr=0.1))
        version = Table.create(cfg, root).snapshot()
        result["readout_backward"] = backward_arms(root, version, args.device, kinds, args.backward_tokens,
                                                   [int(k) for k in args.backward_k.split(",")], args.rows, args.reps)
    sw, rb = result["swaps"], result["readout_backward"]
    result["headline"] = {
        **{f"failed_reads_{name}": arm["failed"] + arm["mixed"] for name, arm in sw.items()},
        **{f"rereads_{name}": arm["rereads"] for name, arm in sw.items()},
        **{f"readout_backward_ms_{name}": round(r["median_ms"], 1) for name, r in rb.items() if "median_ms" in r},
        "backward_tables_bitwise": all(rb["tables_bitwise_grpc"].values()),
    }
    result["provenance"] = prov
    result["provenance"]["loadavg_1_5_15"] = list(os.getloadavg())
    out = args.out or str(RESULTS / f"lease_bench_{args.device.split(':')[0]}.json")
    write_result(out, result, device=args.device)
    return result


if __name__ == "__main__":
    main()
