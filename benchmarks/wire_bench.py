"""Where a remote pushdown readout's time goes, outside training: one readout forward and
backward of the quality benchmark's GPU shape (16,384 tokens x 2 heads = 32,768 rows, k 16,
d_v 64, a 16k-row table over 2 shards), with the in-process table and over 2 loopback shard
server processes, for each wire format; and the shard server's own phases (decode, the
shard's work, encode), timed by calling its servicer in this process without gRPC.

    python benchmarks/wire_bench.py                      # CPU
    python benchmarks/wire_bench.py --device cuda        # rows and requests on the GPU

Per call, median of --reps: `table_ms` (the worker's wall time of Table.readout /
readout_backward, device sync included), `client_rpc_ms` (the gRPC calls, summed over the
shards' parallel calls) and `server_ms` (the servers' handling, summed likewise).
Writes benchmarks/results/wire_bench.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import ByteCounter, cpu_model, provenance, server_handling_seconds  # noqa: E402
from benchmarks.quality import wire_variant  # noqa: E402
from protos import knowledge_store_pb2 as pb  # noqa: E402
from store_service import wire  # noqa: E402
from store_service.config import TableConfig  # noqa: E402
from store_service.table import Table  # noqa: E402
from store_service.testing import loopback_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, reps: int, device: str) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _inputs(rows: int, k: int, d_v: int, num_rows: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_rows, (rows, k), generator=g).to(device)
    w = torch.softmax(torch.randn(rows, k, generator=g), -1).to(device)
    grad = torch.randn(rows, d_v, generator=g).to(device)
    return ids, w, grad


def remote_costs(cfg: TableConfig, root: str, variant: str, ids, w, grad, reps: int, device: str,
                 server_threads: int) -> dict:
    counter = ByteCounter()
    servers: list = []
    with loopback_table(cfg, root, interceptors=[counter], servers=servers, torch_threads=server_threads,
                        **wire_variant(variant)) as table:
        for _ in range(3):   # kernel compilation and allocator warm-up, in each server process
            table.readout(ids, w)
            table.readout_backward(ids, w, grad)
        table.end_step(0)
        out = {}
        for name, fn in (("readout", lambda: table.readout(ids, w)),
                         ("readout_backward", lambda: table.readout_backward(ids, w, grad))):
            rpc = {"readout": "Readout", "readout_backward": "ReadoutBackward"}[name]
            before = [server_handling_seconds(p.metrics_port) for p in servers]
            counter.reset()
            counter.enabled = True
            ms = _median_ms(fn, reps, device)
            counter.enabled = False
            after = [server_handling_seconds(p.metrics_port) for p in servers]
            served = sum(a[rpc][1] - b.get(rpc, (0, 0.0))[1] for a, b in zip(after, before))
            out[name] = {"table_ms": ms, "client_rpc_ms": counter.seconds[rpc] / reps * 1e3,
                         "server_ms": served / reps * 1e3, "calls": counter.calls[rpc] / reps,
                         "wire_mb": counter.bytes[rpc] / reps / 1e6}
        table.end_step(1)
    return out


def server_phases(cfg: TableConfig, root: str, ids, w, grad, reps: int, device: str) -> dict:
    """The servicer's Readout / ReadoutBackward on shard 0's share, called in-process (no
    gRPC): decode + expand, the shard's own work, encode. Rows on `device`."""
    from store_service.shard import Shard

    table = Table.create(cfg, root)
    version = table.snapshot()
    table.close()
    shard = Shard.load(root, version, 0, device=device)
    info = shard.describe().info
    owned = (ids >= info.row_start) & (ids < info.row_end)
    req = pb.ReadoutBackwardRequest()
    wire.slots_to_proto(owned, req.slots)
    wire.ids_to_proto(ids[owned], req.ids)
    wire.to_proto(w[owned], req.weights)
    wire.to_proto(grad, req.grad_out)
    data = req.SerializeToString()

    def decode():
        r = pb.ReadoutBackwardRequest.FromString(data)
        _, i, ww = wire.readout_entries_from_proto(r, device)   # expanded where the rows are, as the server does
        g = wire.from_proto(r.grad_out, "grad_out", ndim=2)
        return i, ww, g

    i, ww, g = decode()
    out = shard.readout(i, ww)
    phases = {"decode_expand_ms": _median_ms(decode, reps, device),
              "shard_readout_ms": _median_ms(lambda: shard.readout(i, ww), reps, device),
              "shard_backward_ms": _median_ms(lambda: shard.readout_backward(i, ww, g), reps, device),
              "encode_out_fp32_ms": _median_ms(lambda: pb.ReadoutResponse(out=wire.to_proto(out)).SerializeToString(),
                                               reps, device),
              "encode_out_bf16_ms": _median_ms(
                  lambda: pb.ReadoutResponse(out=wire.to_proto(out.to(torch.bfloat16))).SerializeToString(), reps, device),
              "rows": int(ids.shape[0]), "owned_entries": int(owned.sum())}
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=32768, help="readout rows per call (tokens x heads)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--d-v", type=int, default=64)
    ap.add_argument("--n-sub", type=int, default=128, help="product-key table of n_sub^2 rows")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--variants", default="grid-fp32,compact-fp32,compact-bf16,compact-bf16-c8192")
    ap.add_argument("--out", default=str(RESULTS / "wire_bench.json"))
    args = ap.parse_args()

    cfg = TableConfig(d_k=32, d_v=args.d_v, segments=[("product", args.n_sub)], num_shards=2, device=args.device)
    ids, w, grad = _inputs(args.rows, args.k, args.d_v, args.n_sub ** 2, args.device)
    host = f"CPU: {cpu_model()}, torch {torch.__version__}"
    device = f"GPU: {torch.cuda.get_device_name(0)}; {host}" if args.device.startswith("cuda") else host
    result = {"benchmark": "wire_bench", "provenance": provenance(device=args.device), "device": device,
              "config": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        local = Table.create(cfg, f"{d}/local")
        result["in_process"] = {
            "readout": {"table_ms": _median_ms(lambda: local.readout(ids, w), args.reps, args.device)},
            "readout_backward": {"table_ms": _median_ms(lambda: local.readout_backward(ids, w, grad), args.reps,
                                                        args.device)}}
        local.close()
        result["remote"] = {}
        for v in args.variants.split(","):
            result["remote"][v] = remote_costs(cfg, f"{d}/{v}", v, ids, w, grad, args.reps, args.device,
                                               args.server_threads)
            print(v, json.dumps(result["remote"][v]), flush=True)
        result["server_phases"] = server_phases(cfg, f"{d}/phases", ids, w, grad, args.reps, args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"in_process": result["in_process"], "server_phases": result["server_phases"]}, indent=2))


if __name__ == "__main__":
    main()
