"""gRPC server of one shard: thin servicers over a `ShardHandle` (DESIGN.md section 5).

Every RPC goes the same way: check the bearer token (StoreAdmin only), convert
wire -> tensors (`store_service.wire`), call the shard, convert back. Domain
errors become status codes in exactly one place, `status_of`; the client maps
them back in `store_service.client.error_from_rpc`.

    handle = serve_shard(shard, port=0, admin_token="secret", metrics_port=0)
    handle.address        # "127.0.0.1:<port>"
    handle.stop()

As a process (one shard of a published version):

    python -m store_service.server --store-root ROOT --version 3 --shard 0 --port 50051 \
        --metrics-port 9100          # admin token from $KSTORE_ADMIN_TOKEN
"""
from __future__ import annotations

import argparse
import hmac
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, wire
from store_service.interface import PAD_ID, ShardDescription, ShardHandle
from store_service.metrics import ServerMetrics

log = logging.getLogger(__name__)

STORE_SERVICE = pb.DESCRIPTOR.services_by_name["KnowledgeStore"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["StoreAdmin"].full_name

# Trailing metadata that carries what a status code alone cannot.
MD_ERROR = "ks-error"                        # domain error class, e.g. "stale-version"
MD_FIELD = "ks-field"                        # the offending field of an INVALID_ARGUMENT
MD_REQUESTED_VERSION = "ks-requested-version"
MD_SERVING_VERSION = "ks-serving-version"

DEFAULT_MAX_MESSAGE_MB = 256


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Domain error -> (status code, message, trailing metadata). The one mapping."""
    if isinstance(exc, errors.InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ((MD_ERROR, "invalid-argument"), (MD_FIELD, exc.field))
    if isinstance(exc, errors.StaleVersion):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), (
            (MD_ERROR, "stale-version"),
            (MD_REQUESTED_VERSION, str(exc.requested)),
            (MD_SERVING_VERSION, str(exc.serving)))
    if isinstance(exc, errors.NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc), ((MD_ERROR, "not-found"),)
    if isinstance(exc, errors.FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), ((MD_ERROR, "failed-precondition"),)
    if isinstance(exc, errors.Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc), ((MD_ERROR, "unauthenticated"),)
    if isinstance(exc, errors.ShardUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc), ((MD_ERROR, "unavailable"),)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", ((MD_ERROR, "internal"),)


class _Rpc:
    """What every servicer method shares: auth, error mapping, metrics, replay of retried mutations."""

    def __init__(self, shard: ShardHandle, admin_token: str, metrics: ServerMetrics,
                 on_admin_change: Callable[[], None]):
        self.shard = shard
        self._token = f"Bearer {admin_token}".encode()
        self.metrics = metrics
        self._on_admin_change = on_admin_change
        self._replayed: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._replay_lock = threading.Lock()

    def _check_token(self, context: grpc.ServicerContext) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._token):
                    return
                raise errors.Unauthenticated("the bearer token in `authorization` metadata is not valid")
        raise errors.Unauthenticated("StoreAdmin needs `authorization: Bearer <token>` metadata")

    def handle(self, method: str, context: grpc.ServicerContext, call: Callable[[], Any], *,
               admin: bool = False, request_id: str = "", items: int = 0):
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if admin:
                self._check_token(context)
            if not request_id:
                return call()
            # A retried mutation (same request_id) is answered from the first attempt.
            with self._replay_lock:
                key = (method, request_id)
                if key not in self._replayed:
                    self._replayed[key] = call()
                    while len(self._replayed) > 1024:
                        self._replayed.popitem(last=False)
                return self._replayed[key]
        except Exception as exc:
            code, message, trailing = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            context.set_trailing_metadata(trailing)
            context.abort(code, message)
        finally:
            self.metrics.observe(method, code.name, time.perf_counter() - start, items)
            if admin and code == grpc.StatusCode.OK:
                self._on_admin_change()


def _describe_response(d: ShardDescription) -> pb.DescribeResponse:
    i = d.info
    return pb.DescribeResponse(
        info=pb.ShardInfo(shard_id=i.shard_id, row_start=i.row_start, row_end=i.row_end,
                          version=i.version, step=i.step, address=i.address, gated_rows=i.gated_rows,
                          detector_rows=i.detector_rows),
        d_k=d.d_k, d_v=d.d_v, value_dtype=d.value_dtype,
        segments=[pb.Segment(kind=s.kind, row_start=s.row_start, num_rows=s.num_rows, n_sub=s.n_sub)
                  for s in d.segments])


_FLOATS = ("float32",)
_VALUES = ("float32", "bfloat16")
_WIRE_FLOATS = tuple(wire.READOUT_WIRE_DTYPES)   # d_v-wide readout tensors may travel in bfloat16


def _wire_dtype(name: str, field: str) -> torch.dtype:
    try:
        return wire.READOUT_WIRE_DTYPES[name or "float32"]
    except KeyError:
        raise errors.InvalidArgument(field, f"{name!r} is not a readout wire dtype; use one of "
                                            f"{' or '.join(wire.READOUT_WIRE_DTYPES)}") from None


def _readout_entries(request, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(slot mask or None, ids [T, k], weights [T, k]) of a (possibly compacted) readout
    request; a compacted one is expanded on `device`, where the shard's rows are."""
    if not request.HasField("slots"):
        return (None, wire.from_proto(request.ids, "ids", ids=True, ndim=2),
                wire.from_proto(request.weights, "weights", dtypes=_FLOATS, ndim=2))
    mask = wire.slots_from_proto(request.slots, "slots", device=device)
    ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
    weights = wire.from_proto(request.weights, "weights", dtypes=_FLOATS, ndim=1)
    return (mask, wire.scatter_slots(mask, ids, PAD_ID, "ids"),
            wire.scatter_slots(mask, weights, 0.0, "weights"))


def _readout_tokens(request) -> int:
    if request.HasField("slots"):
        return int(request.slots.rows)
    return request.ids.shape[0] if request.ids.shape else 0


class KnowledgeStoreServicer(pb_grpc.KnowledgeStoreServicer):
    def __init__(self, rpc: _Rpc):
        self._rpc = rpc
        self._shard = rpc.shard

    @property
    def _device(self) -> torch.device:
        # Where compacted readouts are expanded: beside the shard's rows when it says where.
        return getattr(self._shard, "device", torch.device("cpu"))

    def Describe(self, request, context):
        return self._rpc.handle("Describe", context, lambda: _describe_response(self._shard.describe()))

    def Search(self, request, context):
        def call():
            queries = wire.from_proto(request.queries, "queries", dtypes=_FLOATS, ndim=2)
            res = self._shard.search(queries, int(request.k), detectors=int(request.detectors),
                                     version=request.version)
            resp = pb.SearchResponse()
            wire.ids_to_proto(res.ids, resp.ids)
            wire.to_proto(res.scores, resp.scores)
            wire.to_proto(res.keys, resp.keys)
            if res.cue is not None and res.gate is not None and bool((res.cue >= 0).any() or (res.gate >= 0).any()):
                wire.ids_to_proto(res.cue, resp.cue)
                wire.ids_to_proto(res.gate, resp.gate)
            if res.detectors is not None:
                d = res.detectors
                wire.ids_to_proto(d.ids, resp.detectors.ids)
                wire.to_proto(d.scores, resp.detectors.scores)
                wire.ids_to_proto(d.cue, resp.detectors.cue)
                wire.ids_to_proto(d.gate, resp.detectors.gate)
            return resp
        return self._rpc.handle("Search", context, call, items=request.queries.shape[0] if request.queries.shape else 0)

    def Fetch(self, request, context):
        def call():
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            out_dtype = _wire_dtype(request.out_dtype, "out_dtype") if request.out_dtype else None
            usage = {}
            if request.HasField("hits") or request.HasField("weight_sum"):
                usage = dict(hits=wire.from_proto(request.hits, "hits", ids=True, ndim=1),
                             weight_sum=wire.from_proto(request.weight_sum, "weight_sum",
                                                        dtypes=("float64", "float32"), ndim=1).double())
            values = self._shard.fetch(ids, version=request.version, **usage)
            resp = pb.FetchResponse()
            wire.to_proto(values if out_dtype is None else values.to(out_dtype), resp.values)
            return resp
        return self._rpc.handle("Fetch", context, call, items=request.ids.shape[0] if request.ids.shape else 0)

    def AccumulateValueGrads(self, request, context):
        def call():
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            grads = wire.from_proto(request.grads, "grads", dtypes=_WIRE_FLOATS, ndim=2).float()
            self._shard.accumulate_value_grads(ids, grads, request_id=request.request_id, version=request.version)
            return pb.AccumulateValueGradsResponse()
        return self._rpc.handle("AccumulateValueGrads", context, call,
                                items=request.ids.shape[0] if request.ids.shape else 0)

    def Readout(self, request, context):
        def call():
            mask, ids, weights = _readout_entries(request, self._device)
            out_dtype = _wire_dtype(request.out_dtype, "out_dtype")
            resp = pb.ReadoutResponse()
            wire.to_proto(self._shard.readout(ids, weights, version=request.version).to(out_dtype), resp.out)
            return resp
        return self._rpc.handle("Readout", context, call, items=_readout_tokens(request))

    def ReadoutBackward(self, request, context):
        # request_id is passed to the shard, which owns the dedup of row-gradient accumulation.
        def call():
            mask, ids, weights = _readout_entries(request, self._device)
            grad_out = wire.from_proto(request.grad_out, "grad_out", dtypes=_WIRE_FLOATS, ndim=2).float()
            grad_w = self._shard.readout_backward(ids, weights, grad_out, request_id=request.request_id,
                                                  version=request.version)
            resp = pb.ReadoutBackwardResponse()
            wire.to_proto(grad_w if mask is None else grad_w[mask.to(grad_w.device)], resp.grad_weights)
            return resp
        return self._rpc.handle("ReadoutBackward", context, call, items=_readout_tokens(request))

    def AccumulateKeyGrads(self, request, context):
        def call():
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            grads = wire.from_proto(request.grads, "grads", dtypes=_FLOATS, ndim=2)
            self._shard.accumulate_key_grads(ids, grads, request_id=request.request_id, version=request.version)
            return pb.AccumulateKeyGradsResponse()
        return self._rpc.handle("AccumulateKeyGrads", context, call)

    def EndStep(self, request, context):
        def call():
            timeout_s = request.timeout_s if request.timeout_s > 0 else 60.0
            step = self._shard.end_step(int(request.step), worker=int(request.worker),
                                        num_workers=int(request.num_workers) or 1,
                                        request_id=request.request_id, timeout_s=timeout_s)
            return pb.EndStepResponse(step=step)
        return self._rpc.handle("EndStep", context, call)


class StoreAdminServicer(pb_grpc.StoreAdminServicer):
    def __init__(self, rpc: _Rpc):
        self._rpc = rpc
        self._shard = rpc.shard

    def _admin(self, method, context, call, request_id=""):
        return self._rpc.handle(method, context, call, admin=True, request_id=request_id)

    def Describe(self, request, context):
        return self._admin("Admin.Describe", context, lambda: _describe_response(self._shard.describe()))

    def AddRows(self, request, context):
        def call():
            # Copies: the shard keeps these rows, and must not alias the request's buffer.
            values = wire.from_proto(request.values, "values", dtypes=_VALUES, ndim=2).clone()
            keys = wire.from_proto(request.keys, "keys", dtypes=_FLOATS, ndim=2).clone()
            bias = wire.from_proto(request.bias, "bias", dtypes=_FLOATS, ndim=1).clone() \
                if request.HasField("bias") else None
            groups = {name: wire.from_proto(getattr(request, name), name, dtypes=("int64",), ndim=1).clone()
                      for name in ("cue", "gate") if request.HasField(name)}
            resp = pb.AddRowsResponse()
            wire.to_proto(self._shard.add_rows(values, keys, bias, **groups), resp.ids)
            return resp
        return self._admin("AddRows", context, call, request.request_id)

    def _set_flag(self, method, setter, request, context):
        def call():
            setter(wire.from_proto(request.ids, "ids", ids=True, ndim=1), bool(request.value))
            return pb.SetFlagResponse()
        return self._admin(method, context, call, request.request_id)

    def SetFrozen(self, request, context):
        return self._set_flag("SetFrozen", self._shard.set_frozen, request, context)

    def SetAblated(self, request, context):
        return self._set_flag("SetAblated", self._shard.set_ablated, request, context)

    def Usage(self, request, context):
        def call():
            u = self._shard.usage()
            resp = pb.UsageResponse()
            wire.to_proto(u.hits, resp.hits)
            wire.to_proto(u.weight_sum, resp.weight_sum)
            wire.to_proto(u.frozen, resp.frozen)
            wire.to_proto(u.ablated, resp.ablated)
            return resp
        return self._admin("Usage", context, call)

    def WriteSnapshot(self, request, context):
        def call():
            self._shard.write_snapshot(request.version_dir, int(request.version))
            return pb.VersionResponse()
        return self._admin("WriteSnapshot", context, call, request.request_id)

    def PrepareVersion(self, request, context):
        def call():
            self._shard.prepare_version(request.store_root, int(request.version))
            return pb.VersionResponse()
        return self._admin("PrepareVersion", context, call, request.request_id)

    def FlipVersion(self, request, context):
        def call():
            self._shard.flip_version(int(request.version))
            return pb.VersionResponse()
        return self._admin("FlipVersion", context, call, request.request_id)

    def ReleaseVersion(self, request, context):
        def call():
            self._shard.release_version(int(request.version))
            return pb.VersionResponse()
        return self._admin("ReleaseVersion", context, call, request.request_id)


@dataclass
class ShardServer:
    """A running shard server. `stop()` shuts gRPC and the metrics endpoint down."""
    server: grpc.Server
    host: str
    port: int
    health: health.HealthServicer
    metrics: ServerMetrics
    metrics_port: int | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> "ShardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_shard(shard: ShardHandle, port: int = 0, *, admin_token: str, host: str = "127.0.0.1",
                metrics_port: int | None = None, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                max_workers: int = 8) -> ShardServer:
    """Serve `shard` over gRPC on host:port (0: a free port); returns the running server.

    metrics_port: None for no metrics endpoint, 0 for a free port. Requests larger
    than max_message_mb are refused by gRPC with RESOURCE_EXHAUSTED before they
    reach the shard.
    """
    if not admin_token:
        raise ValueError("serve_shard needs a non-empty admin_token")
    metrics = ServerMetrics(shard)
    health_servicer = health.HealthServicer()

    def refresh_health() -> None:
        ok = False
        try:
            ok = bool(shard.health())
        except Exception:
            log.exception("shard health check failed")
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", STORE_SERVICE, ADMIN_SERVICE):
            health_servicer.set(name, status)

    rpc = _Rpc(shard, admin_token, metrics, refresh_health)
    limit = max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kstore-rpc"),
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", -1),
                 ("grpc.so_reuseport", 0)])
    pb_grpc.add_KnowledgeStoreServicer_to_server(KnowledgeStoreServicer(rpc), server)
    pb_grpc.add_StoreAdminServicer_to_server(StoreAdminServicer(rpc), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (STORE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(bind)
    if bound == 0:
        raise RuntimeError(f"could not bind {bind}")
    refresh_health()
    server.start()
    handle = ShardServer(server=server, host=host, port=bound, health=health_servicer, metrics=metrics)
    if metrics_port is not None:
        handle.metrics_port = metrics.serve_http(metrics_port, addr=host if ":" not in host else "::")
    return handle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve one shard of a published table version over gRPC.")
    parser.add_argument("--store-root", required=True)
    parser.add_argument("--version", type=int, required=True, help="published version to load")
    parser.add_argument("--shard", type=int, required=True, help="shard id within that version")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind ('::' or '0.0.0.0' for all)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: a free one)")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB)
    parser.add_argument("--workers", type=int, default=8, help="gRPC handler threads")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default=None,
                        help="where this shard's rows live, e.g. cpu or cuda:1 (default: the published table's "
                             "device); a swapped-in version stays there")
    parser.add_argument("--admin-token-env", default="KSTORE_ADMIN_TOKEN",
                        help="environment variable holding the StoreAdmin bearer token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    token = os.environ.get(args.admin_token_env, "")
    if not token:
        parser.error(f"set ${args.admin_token_env} to the StoreAdmin bearer token")
    try:
        shard = load_shard(args.store_root, args.version, args.shard, device=args.device)
    except errors.StoreError as e:   # a clear line, not a traceback, for a bad version or device
        parser.exit(2, f"kstore-shard {args.shard}: cannot serve version {args.version} of {args.store_root}: {e}\n")
    handle = serve_shard(shard, args.port, admin_token=token, host=args.host, metrics_port=args.metrics_port,
                         max_message_mb=args.max_message_mb, max_workers=args.workers)
    # One parseable line: launchers (tests, benchmarks, cluster) read the bound ports from it.
    print(f"kstore-shard {args.shard} serving {handle.address} metrics {handle.metrics_port}", flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    handle.stop(grace=2.0)


@dataclass
class ShardProcess:
    """A shard server running as its own process (`python -m store_service.server`)."""
    proc: "subprocess.Popen[str]"
    shard_id: int
    address: str
    metrics_port: int | None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_shard_process(store_root: str, version: int, shard_id: int, *, admin_token: str, port: int = 0,
                        host: str = "127.0.0.1", metrics_port: int | None = None, extra_args: Sequence[str] = (),
                        env: dict[str, str] | None = None, startup_timeout_s: float = 60.0) -> ShardProcess:
    """Launch one shard server process and wait until it reports its bound address."""
    cmd = [sys.executable, "-m", "store_service.server", "--store-root", str(store_root), "--version", str(version),
           "--shard", str(shard_id), "--port", str(port), "--host", host, *extra_args]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    # Idle OpenMP threads sleep instead of spinning: several servers (and their
    # clients) often share a machine's cores, and spinning threads starve them.
    full_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(env or {}), "KSTORE_ADMIN_TOKEN": admin_token}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=full_env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(f"shard server {shard_id} exited with {proc.returncode} before serving")
            continue
        m = re.match(r"kstore-shard (\d+) serving (\S+) metrics (\S+)", line)
        if m:
            mport = None if m.group(3) == "None" else int(m.group(3))
            return ShardProcess(proc, shard_id, m.group(2), mport)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"shard server {shard_id} did not start within {startup_timeout_s}s")


def load_shard(store_root: str, version: int, shard_id: int, device: str | None = None) -> ShardHandle:
    from store_service.shard import Shard
    return Shard.load(store_root, version, shard_id, device=device)


if __name__ == "__main__":
    main()
