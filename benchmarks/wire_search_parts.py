"""Where a remote search's time goes (issue 21; benchmarks/WIRE_NOTES.md), measured by
wire_bench's search phase beside the end-to-end figures:

- shard_host: the shard's own search with the queries on the host and the answer brought back
  to the host: what a shard server does for one call, without the wire.
- encode_request / encode_answer / decode_answer: the raw-bytes codec (store_service/wire_search.py)
  alone, on this process's CPU.
- rpc_1_query: a remote search of one query: the fixed cost of a round trip (both processes'
  gRPC threads, HTTP/2 framing, the loopback).
- shard_call: RemoteShard.search alone (no Table around it: no query check, no merge).
- client_gc: the collector's pauses in this process during search_reps remote searches
  (the shard server process freezes its startup heap, store_service/serve.py).
- protobuf: the same server asked the way the client asked before (the generated stub, a
  protobuf-encoded SearchRequest with the queries as a bytes field, the answer parsed by
  protobuf and converted by wire.search_result_from_proto): the client-side before/after.
"""
from __future__ import annotations

import contextlib
import gc
import subprocess
import time
from pathlib import Path

import torch

from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import wire, wire_search


def _timed(fn, args) -> dict:
    from benchmarks.wire_bench import timed_ms
    return timed_ms(fn, args.search_reps, args.device, args.search_warmup)


def self_signed_cert(directory: str) -> tuple[str, str]:
    """A fresh self-signed certificate for 127.0.0.1 / localhost (openssl) -> (cert, key) paths."""
    cert, key = str(Path(directory) / "server.crt"), str(Path(directory) / "server.key")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(exc.stderr.decode(errors="replace")[-200:]) from None
    return cert, key


def local_parts(table, queries: torch.Tensor, args) -> dict:
    shard = table.shards[0]
    q_host = queries.cpu()

    def shard_host():
        res = shard.search(q_host, 32)
        return res.ids.cpu(), res.scores.cpu()
    res = shard.search(q_host, 32)
    request = wire_search.encode_search_request(queries, 32, (), None, None, 0)
    answer = wire_search.encode_search_result(res)
    out = {"shard_host": _timed(shard_host, args),
           "encode_request": _timed(lambda: wire_search.encode_search_request(queries, 32, (), None, None, 0), args),
           "encode_answer": _timed(lambda: wire_search.encode_search_result(res), args),
           "decode_answer": _timed(lambda: wire_search.decode_search_result(answer, (), False), args),
           "request_mb": len(request) / 1e6, "answer_mb": len(answer) / 1e6}
    print("search parts (local): " + ", ".join(f"{k} {v['median']:.2f} ms" for k, v in out.items()
                                               if isinstance(v, dict)), flush=True)
    return out


def remote_parts(table, open_table, queries: torch.Tensor, args) -> dict:
    shard = table.shards[0]
    stub = pb_grpc.KnowledgeStoreStub(shard.channels[0])
    md = shard.data_metadata

    def protobuf():
        req = wire.search_request_to_proto(queries, 32, (), None, None, 0)
        r = stub.Search(req, timeout=120, metadata=md)
        res = wire.search_result_from_proto(r, (), False)
        return res.ids.to(queries.device), res.scores.to(queries.device)
    with gc_pauses() as pauses:
        for _ in range(args.search_reps):
            table.search(queries, 32)
    out = {"client_gc": pauses,
           "rpc_1_query": _timed(lambda: table.search(queries[:1], 32), args),
           "shard_call": _timed(lambda: shard.search(queries, 32), args),
           "protobuf": _timed(protobuf, args)}
    print("search parts (remote): " + ", ".join(f"{k} {v['median']:.2f} ms" for k, v in out.items()
                                                if "median" in v) + f"; client gc {pauses}", flush=True)
    return out


@contextlib.contextmanager
def gc_pauses():
    """{collections per generation, total and longest pause in ms} while the block runs."""
    out = {"collections": {0: 0, 1: 0, 2: 0}, "ms": 0.0, "max_ms": 0.0}
    started = [0.0]

    def watch(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            ms = (time.perf_counter() - started[0]) * 1e3
            out["collections"][info["generation"]] += 1
            out["ms"] += ms
            out["max_ms"] = max(out["max_ms"], ms)
    gc.callbacks.append(watch)
    try:
        yield out
    finally:
        gc.callbacks.remove(watch)
