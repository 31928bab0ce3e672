"""Remote search before and after issue 21's raw-bytes search (benchmarks/WIRE_NOTES.md),
side by side in one run: two shard server processes over the same published table, one
running an earlier tree's code (--base-tree: e.g. `git archive main | tar -x -C DIR` taken
before this change), one this tree's; the client asks the first the way that tree's client
did (a protobuf-encoded SearchRequest through the generated stub, the answer parsed by
protobuf) and the second through RemoteShard (raw bytes both ways). Calls alternate between
the two, so both see the same load. Also times the shard's own search in this process (host
queries in, host answer out): the rest of a remote call is the wire's.

    git archive <before-commit> | tar -x -C /tmp/base
    python benchmarks/wire_search_ab.py --base-tree /tmp/base --rows 65536 --reps 30
"""
from __future__ import annotations

import argparse
import math
import secrets
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from protos import knowledge_store_pb2 as pb  # noqa: E402
from store_service import wire, wire_search  # noqa: E402
from store_service.client import connect  # noqa: E402
from store_service.config import TableConfig  # noqa: E402
from store_service.serve import start_shard_process  # noqa: E402
from store_service.table import Table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _protobuf_search(self, queries, k, *, tags=(), where=None, side=None, want_keys=False, version=0):
    """RemoteShard.search as the client did it before (one protobuf message each way)."""
    req = wire.search_request_to_proto(queries, k, tags, where, side, version, want_keys)
    r = self._call(self._store.Search, req)
    return wire.search_result_from_proto(r, tags, side is not None)


def _codec_before(queries, res):
    """Client encode, server decode, server encode, client decode, as before (protobuf)."""
    raw = wire.search_request_to_proto(queries, 32, (), None, None, 0).SerializeToString()
    q, _ = wire.search_request_from_proto(pb.SearchRequest.FromString(raw))
    answer = wire.search_result_to_proto(res).SerializeToString()
    return q, wire.search_result_from_proto(pb.SearchResponse.FromString(answer), (), False)


def _codec_after(queries, res):
    """The same four steps, raw bytes (the server's aligned copy for a CPU shard included)."""
    raw = wire_search.encode_search_request(queries, 32, (), None, None, 0)
    q, _ = wire_search.search_request_from_split(*wire_search.split_search_request(raw))
    q = wire_search.aligned_for(q, torch.device("cpu"))
    answer = wire_search.encode_search_result(res)
    return q, wire_search.decode_search_result(answer, (), False)


def _stats(ts: list[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "reps": len(ts)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-tree", required=True, help="a checkout (no .git needed) of the code before the change")
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d-k", type=int, default=128)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "wire_search_ab_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.server_threads)
    base = str(Path(args.base_tree).resolve())
    queries = torch.randn(args.queries, args.d_k, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        cfg = TableConfig(d_k=args.d_k, d_v=64, segments=[("product", math.isqrt(args.rows))], num_shards=1,
                          value_dtype="bfloat16", store_codebooks=True, seed=0)
        t = Table.create(cfg, root)
        version = t.snapshot()
        t.close()
        local = Table.open(root, version)
        shard = local.shards[0]
        token = secrets.token_hex(8)
        extra = ["--torch-threads", str(args.server_threads)]
        # The earlier tree's server: its own packages first, never this tree's (PYTHONSAFEPATH:
        # the working directory is not put on sys.path).
        procs = {"before": start_shard_process(root, version, 0, admin_token=token, extra_args=extra,
                                               env={"PYTHONPATH": base, "PYTHONSAFEPATH": "1"}),
                 "after": start_shard_process(root, version, 0, admin_token=token, extra_args=extra)}
        try:
            tables = {name: connect([p.address], admin_token=token, store_root=root, timeout_s=120)
                      for name, p in procs.items()}
            for s in tables["before"].shards:
                s.search = types.MethodType(_protobuf_search, s)
            arms = {"before": lambda: tables["before"].search(queries, args.k),
                    "after": lambda: tables["after"].search(queries, args.k),
                    "shard_host": lambda: shard.search(queries, args.k)}
            ref = shard.search(queries, args.k)
            for name in ("before", "after"):
                got = arms[name]()
                if not (torch.equal(got.ids, ref.ids) and torch.equal(got.scores, ref.scores)):
                    raise SystemExit(f"{name}: the remote answer differs from the in-process one")
            # The codecs alone, both sides, in this process (no network): what each way costs on
            # top of gRPC's own copies and the loopback.
            arms["codec_before"] = lambda: _codec_before(queries, ref)
            arms["codec_after"] = lambda: _codec_after(queries, ref)
            times: dict[str, list[float]] = {name: [] for name in arms}
            for i in range(args.warmup + args.reps):
                for name, fn in arms.items():
                    t0 = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            for tb in tables.values():
                for s in tb.shards:
                    s.close()
        finally:
            for p in procs.values():
                p.stop()
    ms = {name: _stats(ts) for name, ts in times.items()}
    over = {name: statistics.median(a - b for a, b in zip(times[name], times["shard_host"])) for name in ("before", "after")}
    payload = {"benchmark": "wire_search_ab", "config": vars(args), "ms": ms,
               "headline": {"search_ms_remote_before": ms["before"]["median"], "search_ms_remote_after": ms["after"]["median"],
                            "search_ms_shard_host": ms["shard_host"]["median"],
                            "before_over_after": ms["before"]["median"] / ms["after"]["median"],
                            "wire_ms_before": over["before"], "wire_ms_after": over["after"],
                            "codec_ms_before": ms["codec_before"]["median"], "codec_ms_after": ms["codec_after"]["median"],
                            "codec_before_over_after": ms["codec_before"]["median"] / ms["codec_after"]["median"],
                            "queries": args.queries, "k": args.k, "rows": math.isqrt(args.rows) ** 2,
                            "bitwise_equal_to_in_process": True}}
    return write_result(args.out, payload, argv)


if __name__ == "__main__":
    main()
