"""How the store stands up to hostile and careless clients (issue 18), over real shard
server processes on this machine:

- every (RPC, field, attack class) that `store_service.hostile` builds from server
  reflection, plus issue 18's exact calls, each sent with and without credentials: no
  UNKNOWN/INTERNAL, every call without credentials refused UNAUTHENTICATED, the server
  alive; then a random fuzz for --fuzz-seconds; then the stored rows checked finite;
- back-to-back hot swaps under load (4 client threads calling search and fetch without
  pause): calls that failed;
- a shard killed (SIGKILL) and restarted at the same address, --restarts times: seconds
  from its "serving" line to the first successful call of a client that was connected
  before (p50 / p95 / max).

    nice -n 10 python -m benchmarks.reliability                # ~2 min on 2 CPU cores
    python -m benchmarks.reliability --fuzz-seconds 2 --swaps 4 --restarts 2 --out /tmp/r.json   # smoke

Writes benchmarks/results/reliability.json (headline, cases, attack classes, provenance).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time

import numpy as np
import torch

from benchmarks.capacity_report import provenance
from protos import knowledge_store_pb2 as pb
from store_service import persistence, wire
from store_service.auth import Tokens
from store_service.client import RemoteShard, connect
from store_service.config import OptimizerConfig, TableConfig
from store_service.hostile import BAD_CODES, Case, HostileClient, judge
from store_service.serve import start_shard_process
from store_service.table import Table

D_K, D_V = 16, 32
TOKENS = Tokens(admin="bench-admin", train="bench-train", read="bench-read")
KS = "/knowledge_store.v1.KnowledgeStore/"


def _publish(root: str, num_shards: int) -> tuple[int, int]:
    cfg = TableConfig(d_k=D_K, d_v=D_V, segments=[("product", 16), ("flat", 100)], store_codebooks=True,
                      num_shards=num_shards, optimizer=OptimizerConfig("adam", lr=0.1))
    t = Table.create(cfg, root)
    v1 = t.snapshot()
    t.set_ablated(torch.tensor([3]), True)
    v2 = t.snapshot()
    t.close()
    return v1, v2


def _issue_calls() -> list[Case]:
    """Issue 18's exact calls (cases 1-4, 6), as cases of their own."""
    T = wire.to_proto
    grads = torch.full((2, D_V), 3e38)
    bits = bytearray((1 << 20) // 8)
    bits[0] = 1
    calls = [
        ("EndStep", "timeout_s", "issue1_timeout_inf", pb.EndStepRequest(worker=0, num_workers=2, timeout_s=math.inf)),
        ("EndStep", "timeout_s", "issue1_timeout_1e10", pb.EndStepRequest(worker=0, num_workers=2, timeout_s=1e10)),
        ("AccumulateValueGrads", "grads", "issue2_3e38",
         pb.AccumulateValueGradsRequest(ids=T(torch.tensor([10, 10])), grads=T(grads))),
        ("ReadoutBackward", "weights", "issue2_1e20",
         pb.ReadoutBackwardRequest(ids=T(torch.tensor([[11]])), weights=T(torch.tensor([[1e20]])),
                                   grad_out=T(torch.full((1, D_V), 1e20)))),
        ("AccumulateKeyGrads", "grads", "issue2_key_3e38",
         pb.AccumulateKeyGradsRequest(ids=T(torch.tensor([300, 300])), grads=T(torch.full((2, D_K), 3e38)))),
        ("Search", "k", "issue3_k65536", pb.SearchRequest(k=65536, queries=T(torch.randn(64, D_K)))),
        ("Readout", "slots", "issue3_mask_2e20", pb.ReadoutRequest(
            ids=T(torch.tensor([11])), weights=T(torch.tensor([1.0])),
            slots=pb.SlotMask(rows=1 << 20, cols=1, bits=bytes(bits)))),
        ("Fetch", "hits", "issue4_hits_2e62", pb.FetchRequest(
            ids=T(torch.tensor([20])), hits=T(torch.tensor([2 ** 62])),
            weight_sum=T(torch.tensor([-1e300], dtype=torch.float64)))),
    ]
    out = [Case(KS + m, f, a, r.SerializeToString()) for m, f, a, r in calls]
    for i, path in enumerate(["float32", ".", "../../etc/passwd", "x" * 10_000, "/proc/self", "a\x00b"]):
        out.append(Case("/knowledge_store.v1.StoreAdmin/WriteSnapshot", "version_dir", f"issue6_path{i}",
                        pb.WriteSnapshotRequest(version_dir=path, version=7).SerializeToString()))
    return out


def attack(root: str, fuzz_seconds: float) -> dict:
    v1, _ = _publish(root, 1)
    proc = start_shard_process(root, v1, 0, tokens=TOKENS)
    try:
        client = HostileClient(proc.address, TOKENS.admin, timeout_s=3.0)
        cases = _issue_calls() + client.cases()
        rows, problems, dead = [], [], False
        for case in cases:
            codes = {creds: client.send(case, credentials=creds) for creds in (True, False)}
            for creds, code in codes.items():
                problems += judge(case, creds, code)
            rows.append({"rpc": case.method.rsplit("/", 2)[-1], "service": case.method.split("/")[1],
                         "field": case.field, "attack": case.attack, "with_credentials": codes[True],
                         "without_credentials": codes[False]})
            if not client.alive():
                dead = True
                problems.append(f"server dead after {case.method} {case.field} {case.attack}")
                break
        iterations, found = client.fuzz(fuzz_seconds, seed=0)
        problems += found
        alive = client.alive() and not dead
        client.channel.close()
        # what is stored afterwards: published (the snapshot refuses non-finite rows) and read back
        table = connect([proc.address], token=TOKENS.admin, store_root=root, timeout_s=30)
        try:
            v = table.snapshot()
            published = True
        except Exception as exc:  # noqa: BLE001 - reported
            published, v = f"{type(exc).__name__}: {exc}", v1
        finally:
            table.close()
            for s in table.shards:
                s.close()
        data = persistence.read_shard(persistence.version_path(root, v), 0)
        vals = persistence.from_numpy(data.arrays["values"], data.attrs.get("value_storage")).float()
        nonfinite = int((~torch.isfinite(vals).all(1)).sum()) + int((~np.isfinite(data.arrays["keys"]).all(1)).sum())
    finally:
        proc.stop()
    internal = sum(1 for r in rows for k in ("with_credentials", "without_credentials") if r[k] in BAD_CODES)
    internal += sum(1 for p in found if any(c in p for c in BAD_CODES))
    unauth = sum(1 for p in problems if "without credentials" in p)
    return {"cases": rows, "problems": problems, "fuzz_iterations": iterations, "server_alive": alive,
            "internal_errors": internal, "unauthenticated_mutations": unauth, "nonfinite_rows": nonfinite,
            "snapshot_after_attack": published}


def swaps_under_load(root: str, swaps: int) -> dict:
    v1, v2 = _publish(root, 2)
    procs = [start_shard_process(root, v1, i, tokens=TOKENS) for i in range(2)]
    addresses = [p.address for p in procs]
    readers = [connect(addresses, token=TOKENS.read, timeout_s=30) for _ in range(2)]
    admin = connect(addresses, token=TOKENS.admin, store_root=root, timeout_s=60)
    stop, failures, calls = threading.Event(), [], [0]

    def hammer(table: Table, worker: int) -> None:
        g = torch.Generator().manual_seed(worker)
        while not stop.is_set():
            try:
                table.search(torch.randn(4, D_K, generator=g), 5)
                table.fetch(torch.randint(0, 356, (16,), generator=g))
                calls[0] += 2
            except Exception as exc:  # noqa: BLE001 - counted
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=hammer, args=(readers[w % 2], w)) for w in range(4)]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    try:
        for i in range(swaps):
            admin.load_version(v2 if i % 2 == 0 else v1)
    finally:
        elapsed = time.monotonic() - t0
        stop.set()
        for th in threads:
            th.join()
        for tb in readers + [admin]:
            tb.close()
            for s in tb.shards:
                s.close()
        for p in procs:
            p.stop()
    return {"swaps": swaps, "seconds": elapsed, "calls": calls[0], "failed_calls": len(failures),
            "failures": failures[:20], "client_threads": 4}


def restarts(root: str, n: int) -> dict:
    v1, _ = _publish(root, 1)
    proc = start_shard_process(root, v1, 0, tokens=TOKENS)
    port = int(proc.address.rsplit(":", 1)[1])
    client = RemoteShard(proc.address, token=TOKENS.read, timeout_s=30)
    client.describe()
    waits = []
    try:
        for _ in range(n):
            proc.proc.kill()
            proc.proc.wait()
            proc.stop()
            try:   # the client sees the shard gone (its channel starts backing off)
                client._call(client._store.Describe, pb.DescribeRequest(), timeout_s=0.5)
            except Exception:  # noqa: BLE001 - expected: unavailable
                pass
            proc = start_shard_process(root, v1, 0, tokens=TOKENS, port=port)   # returns at its serving line
            t0 = time.monotonic()
            client.describe()
            waits.append(time.monotonic() - t0)
    finally:
        client.close()
        proc.stop()
    s = sorted(waits)
    return {"restarts": n, "seconds": waits, "p50": statistics.median(s),
            "p95": s[math.ceil(0.95 * len(s)) - 1],   # nearest rank: of 10, the largest
            "max": s[-1], "min": s[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fuzz-seconds", type=float, default=30.0)
    ap.add_argument("--swaps", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "reliability.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        att = attack(os.path.join(tmp, "attack"), args.fuzz_seconds)
        sw = swaps_under_load(os.path.join(tmp, "swaps"), args.swaps)
        rs = restarts(os.path.join(tmp, "restarts"), args.restarts)
    distinct = sorted({(r["service"], r["rpc"], r["field"], r["attack"]) for r in att["cases"]})
    result = {
        "headline": {
            "cases": len(distinct), "internal_errors": att["internal_errors"],
            "unauthenticated_mutations": att["unauthenticated_mutations"], "nonfinite_rows": att["nonfinite_rows"],
            "server_alive": att["server_alive"], "fuzz_iterations": att["fuzz_iterations"],
            "failed_calls_during_swaps": sw["failed_calls"], "swaps": sw["swaps"],
            "recover_s_after_shard_restart": {k: rs[k] for k in ("p50", "p95", "max")},
        },
        "attack_classes": sorted({r["attack"] for r in att["cases"]}),
        "rpcs": sorted({f'{r["service"]}/{r["rpc"]}' for r in att["cases"]}),
        "cases": att["cases"], "problems": att["problems"], "snapshot_after_attack": att["snapshot_after_attack"],
        "swaps_under_load": sw, "restarts": rs,
        "setup": {"table": f"one shard of 16^2 product + 100 flat rows, d_k {D_K}, d_v {D_V}, served by "
                           "`python -m store_service.serve` on 127.0.0.1 with read/train/admin tokens; swaps over 2 "
                           "shard processes; each case sent with the admin token and with none",
                  "fuzz_seconds": args.fuzz_seconds},
        "provenance": provenance("cpu"),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["headline"], indent=2))


if __name__ == "__main__":
    main()
