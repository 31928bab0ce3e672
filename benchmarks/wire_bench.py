"""The data plane, measured (issue 21; benchmarks/WIRE_NOTES.md): rows, readouts and searches
between a caller and shard server processes on the same host, per transport, against the
in-process table; and training throughput of the d1024 preset with the store in separate
processes vs in process.

    python benchmarks/wire_bench.py --device cuda                    # GPU host: every phase
    python benchmarks/wire_bench.py --device cpu --rows 65536 --phases fetch,search,readout   # smoke

Phases (--phases, comma-separated):
- fetch: Table.fetch of 1,024 / 10,240 / 102,400 distinct rows of d_v bf16 (capped at the
  table's rows) from one shard of --rows rows; in process, over gRPC (TCP loopback, the
  channel pool and streamed replies), and over each same-host transport registered
  (store_service/datapath.py) that the server offers.
- readout: a pushdown readout of 4,096 x 32 entries ([4096, d_v] fp32 out), per transport.
- search: 4,096 queries, k 32 (ids and scores; keys not asked), in process and over gRPC
  (--search-reps after --search-warmup), with where the remote time goes (`search_parts`,
  benchmarks/wire_search_parts.py).
- TLS (--tls, default on): the gRPC fetches and the search again over a TLS channel (`data.tls`).
- train: benchmarks/wire_train.py (the d1024 preset, alternating in-process / remote pairs).
- pushdown: benchmarks/wire_pushdown.py (the readout wire variants at the quality shape).

Each figure: median of --reps timed calls (after 2 warm-up calls) with min and max, device
synchronised around each. Writes benchmarks/results/wire_bench.json (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# This process (the caller) shares the host's cores with its shard server processes. OpenMP
# threads left spinning after each parallel region (the default) take cores a server's gRPC
# and handler threads need, which shows as milliseconds of jitter on every remote call; idle
# threads sleep instead (the servers do the same, store_service/serve.py). Read when the
# OpenMP runtime starts (torch's import), so set before it; an explicit setting wins.
_OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from store_service import datapath  # noqa: E402
from store_service.client import connect  # noqa: E402
from store_service.config import TableConfig  # noqa: E402
from store_service.grpc_datapath import WireConfig  # noqa: E402
from store_service.serve import start_shard_process  # noqa: E402
from store_service.table import Table  # noqa: E402
from store_service.tls import ClientTls  # noqa: E402
from benchmarks import wire_search_parts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FETCH_SIZES = (1024, 10240, 102400)
# Which same-host transport the headline names, in order of preference.
SAME_HOST_ORDER = ("cuda_ipc", "shm")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn, reps: int, device: str, warmup: int = 2) -> dict:
    """{median, min, max} ms of `reps` calls of fn after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "reps": reps}


def _gbps(nbytes: int, ms: dict) -> dict:
    return {k: nbytes / (ms[k] / 1e3) / 1e9 for k in ("median", "min", "max")}


def provenance_of(argv: list[str] | None, device: str) -> dict:
    """benchmarks.common.provenance; called as a function with its own argv (a test), the
    command is this script with that argv, not the caller's command line."""
    from benchmarks.common import provenance
    out = provenance(argv, device=device)
    if argv is not None:
        out["command"] = shlex.join(["python", "benchmarks/wire_bench.py", *argv])
    return out


def device_name(device: str) -> str:
    return f"cuda: {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else "cpu"


def table_config(args) -> TableConfig:
    n_sub = math.isqrt(args.rows)
    return TableConfig(d_k=args.d_k, d_v=args.d_v, segments=[("product", n_sub)], num_shards=1, value_dtype="bfloat16",
                       store_codebooks=True, seed=0, device=args.device)


@contextlib.contextmanager
def served(root: str, version: int, args, data_paths: tuple[str, ...] = (), tls: tuple[str, str] | None = None):
    """One shard server process (rows on --device) and a function that connects a client
    Table to it (wire_config: the gRPC path's settings; default --channels channels).
    tls: (certificate, key) PEM files: the server serves TLS only, the client trusts that certificate."""
    token = secrets.token_hex(8)
    tls_args = ["--tls-cert", tls[0], "--tls-key", tls[1]] if tls else []
    proc = start_shard_process(root, version, 0, admin_token=token, startup_timeout_s=300,
                               extra_args=["--device", args.device, "--torch-threads", str(args.server_threads),
                                           *(["--data-paths", ",".join(data_paths)] if data_paths else []),
                                           *tls_args])
    tables = []

    def open_table(wire_config: WireConfig | None = None):
        tables.append(connect([proc.address], admin_token=token, store_root=root, timeout_s=120,
                              data_paths=data_paths, device=args.device,
                              tls=ClientTls.from_files(tls[0]) if tls else None,
                              wire_config=wire_config or WireConfig(channels=args.channels)))
        return tables[-1]
    open_table.address, open_table.token = proc.address, token
    try:
        yield open_table
    finally:
        for t in tables:
            for s in t.shards:
                s.close()
        proc.stop()


# The gRPC path as it was before issue 21: one channel, one unary Fetch per shard.
UNARY_ONE_CHANNEL = WireConfig(channels=1, stream_min_rows=1 << 62)


def _transports(args) -> list[str]:
    """"grpc" and the transports asked (--transports; default: the same-host ones) that this
    process can use, preferred first. The cross-host one (torch_dist) only when asked: on one
    GPU its NCCL group would put both ranks on the same device, which NCCL does not support."""
    known = {k: t for k, t in datapath.transports().items() if t.available()}
    asked = args.transports.split(",") if args.transports else list(SAME_HOST_ORDER)
    ordered = [k for k in SAME_HOST_ORDER if k in known] + sorted(k for k in known if k not in SAME_HOST_ORDER)
    return ["grpc"] + [k for k in ordered if k in asked]


def data_phases(args, phases: set[str], root: str, version: int) -> dict:
    """fetch / readout / search per transport, in-process first."""
    g = torch.Generator().manual_seed(0)
    rows = math.isqrt(args.rows) ** 2
    sizes = [min(n, rows) for n in FETCH_SIZES]
    fetch_ids = {n: torch.randperm(rows, generator=g)[:n].to(args.device) for n in sizes}
    ro_ids = torch.randint(0, rows, (args.readout_tokens, 32), generator=g).to(args.device)
    ro_w = torch.softmax(torch.randn(args.readout_tokens, 32, generator=g), -1).to(args.device)
    queries = torch.randn(args.search_queries, args.d_k, generator=g).to(args.device)
    row_bytes = args.d_v * 2
    out: dict = {"fetch": {}, "readout": {}, "search": {}, "transport_used": {}}

    def measure(name: str, table) -> None:
        if "fetch" in phases:
            out["fetch"][name] = {}
            for n, ids in fetch_ids.items():
                ms = timed_ms(lambda: table.fetch(ids), args.reps, args.device)
                out["fetch"][name][str(n)] = {"ms": ms, "gbps": _gbps(n * row_bytes, ms), "mb": n * row_bytes / 1e6}
                print(f"fetch {name} {n}: {ms['median']:.2f} ms, {_gbps(n * row_bytes, ms)['median']:.2f} GB/s",
                      flush=True)
        if "readout" in phases:
            ms = timed_ms(lambda: table.readout(ro_ids, ro_w), args.reps, args.device)
            nbytes = args.readout_tokens * args.d_v * 4
            out["readout"][name] = {"ms": ms, "gbps": _gbps(nbytes, ms), "out_mb": nbytes / 1e6}
            print(f"readout {name}: {ms['median']:.2f} ms", flush=True)
        if "search" in phases and name in ("in_process", "grpc"):
            ms = timed_ms(lambda: table.search(queries, 32), args.search_reps, args.device, args.search_warmup)
            out["search"][name] = {"ms": ms, "queries": args.search_queries, "k": 32}
            print(f"search {name}: {ms['median']:.2f} ms ({ms['min']:.2f}-{ms['max']:.2f})", flush=True)

    local = Table.open(root, version, device=args.device)
    measure("in_process", local)
    if "search" in phases:   # what a shard server does besides the wire: host queries in, host answer out
        out["search_parts"] = wire_search_parts.local_parts(local, queries, args)
    local.close()
    del local
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for kind in _transports(args):
        with served(root, version, args, () if kind == "grpc" else (kind,)) as open_table:
            if kind == "grpc" and args.grpc_unary:
                measure("grpc_unary_1_channel", open_table(UNARY_ONE_CHANNEL))
            table = open_table()
            table.fetch(fetch_ids[sizes[0]])
            used = sorted({s.data_path_kind for s in table.shards})
            out["transport_used"][kind] = used
            if used != [kind]:
                print(f"{kind}: not offered for this pair (used {used}); skipped", flush=True)
                continue
            measure(kind, table)
            if kind == "grpc" and "search" in phases:
                out["search_parts"].update(wire_search_parts.remote_parts(table, open_table, queries, args))
    if args.tls:
        out["tls"] = tls_arm(args, phases, root, version, fetch_ids, queries)
    return out


def tls_arm(args, phases: set[str], root: str, version: int, fetch_ids: dict, queries: torch.Tensor) -> dict:
    """The gRPC path's fetch and search again, over TLS (a self-signed certificate made for
    this run; store_service/tls.py), against a server process that serves TLS only."""
    with tempfile.TemporaryDirectory() as d:
        try:
            cert = wire_search_parts.self_signed_cert(d)
        except (OSError, RuntimeError) as exc:
            return {"skipped": f"no certificate: {exc}"}
        out: dict = {"fetch": {}, "search": {}}
        with served(root, version, args, tls=cert) as open_table:
            table = open_table()
            row_bytes = args.d_v * 2
            if "fetch" in phases:
                for n, ids in fetch_ids.items():
                    ms = timed_ms(lambda: table.fetch(ids), args.reps, args.device)
                    out["fetch"][str(n)] = {"ms": ms, "gbps": _gbps(n * row_bytes, ms), "mb": n * row_bytes / 1e6}
                    print(f"fetch grpc+tls {n}: {ms['median']:.2f} ms, {_gbps(n * row_bytes, ms)['median']:.2f} GB/s",
                          flush=True)
            if "search" in phases:
                ms = timed_ms(lambda: table.search(queries, 32), args.search_reps, args.device, args.search_warmup)
                out["search"] = {"ms": ms, "queries": args.search_queries, "k": 32}
                print(f"search grpc+tls: {ms['median']:.2f} ms ({ms['min']:.2f}-{ms['max']:.2f})", flush=True)
        return out


def headline(result: dict) -> dict:
    data = result.get("data", {})
    fetch, readout, search = data.get("fetch", {}), data.get("readout", {}), data.get("search", {})
    same = next((k for k in SAME_HOST_ORDER if k in fetch or k in readout), None)

    def big(name):
        runs = fetch.get(name)
        return runs[max(runs, key=int)]["gbps"]["median"] if runs else None
    train = result.get("train", {})
    tls = data.get("tls") or {}
    tls_fetch = tls.get("fetch") or {}
    return {"fetch_gbps_same_host": big(same) if same else None,
            "fetch_gbps_tcp_tls": tls_fetch[max(tls_fetch, key=int)]["gbps"]["median"] if tls_fetch else None,
            "search_ms_4096_remote_tls": tls["search"]["ms"]["median"] if tls.get("search") else None,
            "search_ms_4096_remote_min": search["grpc"]["ms"]["min"] if "grpc" in search else None,
            "search_ms_4096_remote_max": search["grpc"]["ms"]["max"] if "grpc" in search else None,
            "search_ms_4096_in_process": search["in_process"]["ms"]["median"] if "in_process" in search else None,
            "fetch_gbps_tcp": big("grpc"), "fetch_gbps_in_process": big("in_process"),
            "readout_gbps_same_host": readout[same]["gbps"]["median"] if same in readout else None,
            "search_ms_4096_remote": search["grpc"]["ms"]["median"] if "grpc" in search else None,
            "remote_over_local_tokens_per_s_d1024": train.get("remote_over_local") if
            train.get("preset") == "d1024" else None,
            "same_host_transport": same, "fetch_rows": max((int(n) for n in fetch.get("grpc", {})), default=None),
            "tls": result.get("tls")}


def merge_earlier(result: dict, path: str, force: bool) -> None:
    """Take the phases this call did not run from an earlier result of the same commit."""
    import json
    earlier = json.loads(Path(path).read_text())
    prov, now = earlier.get("provenance", {}), result["provenance"]
    if not force and (prov.get("commit") != now.get("commit") or prov.get("dirty") or now.get("dirty")):
        raise SystemExit(f"--merge {path}: made at commit {prov.get('commit')} (dirty {prov.get('dirty')}), this is "
                         f"{now.get('commit')} (dirty {now.get('dirty')}); rerun it, or pass --force-merge")
    taken = [k for k in ("table", "data", "train", "pushdown") if k in earlier and k not in result]
    for k in taken:
        result[k] = earlier[k]
    # fetch, search and readout all live under "data": a call that ran some of them has "data"
    # with the others empty, and those are taken from the earlier result one by one
    if "data" in result and "data" not in taken:
        for phase, runs in earlier.get("data", {}).items():
            if runs and not result["data"].get(phase):
                result["data"][phase] = runs
                taken.append(f"data.{phase}")
    result["merged"] = {"from": path, "phases": taken, "provenance": prov}


def tls_note(args) -> str:
    if args.tls:
        return ("plain figures without TLS; the gRPC path's fetch and search over TLS (self-signed certificate, "
                "loopback) beside them in data.tls and the headline's *_tls keys")
    return "figures without TLS only (--no-tls)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--phases", default="fetch,search,readout,train")
    ap.add_argument("--rows", type=int, default=1 << 20, help="rows of the fetch/readout/search table (one shard)")
    ap.add_argument("--d-v", type=int, default=1024)
    ap.add_argument("--d-k", type=int, default=128, help="key width (the d1024 preset's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels per shard")
    ap.add_argument("--server-threads", type=int, default=4, help="torch threads of each shard server process")
    ap.add_argument("--transports", default="", help="transports to measure besides gRPC, comma-separated "
                                                       "(default: the same-host ones available, cuda_ipc and shm)")
    ap.add_argument("--grpc-unary", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the gRPC path as it was (one channel, unary Fetch), against the same server")
    ap.add_argument("--search-reps", type=int, default=30, help="timed searches per arm (median, min, max)")
    ap.add_argument("--search-warmup", type=int, default=5, help="untimed searches before them")
    ap.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the gRPC fetch and search over TLS (one more server process)")
    ap.add_argument("--readout-tokens", type=int, default=4096)
    ap.add_argument("--search-queries", type=int, default=4096)
    from benchmarks import wire_train
    wire_train.add_arguments(ap)
    ap.add_argument("--pd-rows", type=int, default=32768)
    ap.add_argument("--pd-k", type=int, default=16)
    ap.add_argument("--pd-d-v", type=int, default=64)
    ap.add_argument("--pd-n-sub", type=int, default=128)
    ap.add_argument("--pd-variants", default="grid-fp32,compact-fp32,compact-bf16,compact-bf16-c8192")
    ap.add_argument("--out", default=str(RESULTS / "wire_bench.json"))
    ap.add_argument("--merge", default=None,
                    help="an earlier wire_bench JSON of the same commit: its phases not run now are kept (so the "
                         "phases can run as separate commands, each within a time limit), marked in `merged`")
    ap.add_argument("--force-merge", action="store_true", help="merge even from another commit or a dirty tree")
    args = ap.parse_args(argv)
    phases = {p for p in args.phases.split(",") if p}
    unknown = phases - {"fetch", "search", "readout", "train", "pushdown"}
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")

    dev = device_name(args.device)
    result: dict = {"benchmark": "wire_bench", "device": dev, "provenance": provenance_of(argv, dev),
                    "config": vars(args), "tls": tls_note(args),
                    "client_omp_wait_policy": {"value": os.environ.get("OMP_WAIT_POLICY"),
                                               "set_by_this_script": _OMP_WAIT_POLICY_SET_HERE}}
    if phases & {"fetch", "search", "readout"}:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            table = Table.create(table_config(args), d)
            version = table.snapshot()
            table.close()
            del table
            result["table"] = {"rows": math.isqrt(args.rows) ** 2, "d_k": args.d_k, "d_v": args.d_v,
                               "value_dtype": "bfloat16", "store_codebooks": True,
                               "shards": 1, "create_and_publish_s": time.perf_counter() - t0}
            result["data"] = data_phases(args, phases, d, version)
    if "train" in phases:
        result["train"] = wire_train.train_phase(args)
    if "pushdown" in phases:
        from benchmarks import wire_pushdown
        result["pushdown"] = wire_pushdown.pushdown_phase(args)
    if args.merge:
        merge_earlier(result, args.merge, args.force_merge)
    result["headline"] = headline(result)
    import json
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["headline"], indent=2))
    return result


if __name__ == "__main__":
    main()
