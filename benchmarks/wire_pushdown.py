"""wire_bench's `pushdown` phase: where a remote pushdown readout's time goes, outside
training: one readout forward and backward of the quality benchmark's GPU shape (16,384 tokens
x 2 heads = 32,768 rows, k 16, d_v 64, a 16k-row table over 2 shards), with the in-process table
and over 2 loopback shard server processes, for each wire format; and the shard server's own
phases (decode, the shard's work, encode), timed by calling its servicer in this process.

    python benchmarks/wire_bench.py --phases pushdown [--device cuda]

Per call, median of --reps: `table_ms` (the worker's wall time of Table.readout /
readout_backward, device sync included), `client_rpc_ms` (the gRPC calls, summed over the
shards' parallel calls) and `server_ms` (the servers' handling, summed likewise).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time

import torch

from benchmarks.common import ByteCounter, server_handling_seconds
from benchmarks.quality import wire_variant
from protos import knowledge_store_pb2 as pb
from store_service import wire
from store_service.config import TableConfig
from store_service.table import Table
from store_service.testing import loopback_table


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


def pushdown_phase(args) -> dict:
    """The readout variants of the quality benchmark's shape (wire_bench --phases pushdown)."""
    cfg = TableConfig(d_k=32, d_v=args.pd_d_v, segments=[("product", args.pd_n_sub)], num_shards=2,
                      device=args.device)
    ids, w, grad = _inputs(args.pd_rows, args.pd_k, args.pd_d_v, args.pd_n_sub ** 2, args.device)
    result = {"config": {"rows": args.pd_rows, "k": args.pd_k, "d_v": args.pd_d_v, "n_sub": args.pd_n_sub}}
    with tempfile.TemporaryDirectory() as d:
        local = Table.create(cfg, f"{d}/local")
        result["in_process"] = {
            "readout": {"table_ms": _median_ms(lambda: local.readout(ids, w), args.reps, args.device)},
            "readout_backward": {"table_ms": _median_ms(lambda: local.readout_backward(ids, w, grad), args.reps,
                                                        args.device)}}
        local.close()
        result["remote"] = {}
        for v in args.pd_variants.split(","):
            result["remote"][v] = remote_costs(cfg, f"{d}/{v}", v, ids, w, grad, args.reps, args.device,
                                               args.server_threads)
            print(v, json.dumps(result["remote"][v]), flush=True)
        result["server_phases"] = server_phases(cfg, f"{d}/phases", ids, w, grad, args.reps, args.device)
    return result


