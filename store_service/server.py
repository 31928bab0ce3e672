"""gRPC server of one shard: thin servicers over a `ShardHandle` (DESIGN.md section 5).

Every RPC goes the same way: the caller's role is checked (`store_service.auth`, one
interceptor for every RPC), the request's size bounded (`store_service.guard`,
`store_service.limits`), converted (`store_service.wire`), the shard called, the answer
converted back. Domain errors become status codes in exactly one place,
`store_service.status.status_of`; the client maps them back in
`store_service.client.error_from_rpc`. The StoreAdmin servicer is in `server_admin`.

    handle = serve_shard(shard, port=0, admin_token="secret", metrics_port=0)
    handle.address        # "127.0.0.1:<port>"
    handle.stop()

A shard server as its own process: `store_service.serve`.
"""
from __future__ import annotations

import logging
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
from store_service import auth, datapath, errors, guard, persistence, validation, wire, wire_chunks, wire_search
from store_service.interface import ShardHandle
from store_service.limits import Limits
from store_service.metrics import ServerMetrics
from store_service.server_admin import StoreAdminServicer
from store_service.status import status_of
from store_service.tls import ServerTls
from store_service.transport.registry import SessionTable
from store_service.transport.service import SERVICE as TRANSPORT_SERVICE
from store_service.transport.service import add_transport_service
from store_service.wire import ADMIN_SERVICE, STORE_SERVICE

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_MB = 256
DEFAULT_FETCH_CHUNK_MB = 4       # a FetchStream piece: large enough to amortise a message, small enough to overlap
_MAX_TRANSPORT_KINDS, _MAX_PARAMS, _MAX_PARAM_CHARS = 16, 64, 4096


class _Rpc:
    """What every servicer method shares: error mapping, metrics, replay of retried mutations.
    Who may call is checked before a servicer runs (`auth.AuthInterceptor`)."""

    def __init__(self, shard: ShardHandle, authority: auth.Authority, metrics: ServerMetrics,
                 on_admin_change: Callable[[], None], limits: Limits, store_root: str | None):
        self.shard = shard
        self.authority = authority
        self.metrics = metrics
        self.limits = limits
        self.store_root = store_root
        self._on_admin_change = on_admin_change
        self._replayed: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._replay_lock = threading.Lock()
        self._dims: tuple[int, int, int] | None = None

    def dims(self) -> tuple[int, int, int]:
        """(d_k, d_v, value itemsize) of the shard, for the size of answers (cached; an
        admin call, which may swap versions, clears it)."""
        if self._dims is None:
            d = self.shard.describe()
            self._dims = (d.d_k, d.d_v, 2 if d.value_dtype == "bfloat16" else 4)
        return self._dims

    def handle(self, method: str, context: grpc.ServicerContext, call: Callable[[], Any], *,
               admin: bool = False, request_id: str = "", items: int | Callable[[], int] = 0):
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
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
            code, message, trailing = status_of(exc, self.limits.max_error_chars)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            if isinstance(exc, (errors.NonFinite, errors.StepRefused)):
                self.metrics.nonfinite.labels(method).inc()
            context.set_trailing_metadata(trailing)
            context.abort(code, message)
        finally:
            self.metrics.observe(method, code.name, time.perf_counter() - start, items() if callable(items) else items)
            if admin and code == grpc.StatusCode.OK:
                self._dims = None
                self._on_admin_change()


_FLOATS = ("float32",)
_WIRE_FLOATS = tuple(wire.READOUT_WIRE_DTYPES)   # d_v-wide readout tensors may travel in bfloat16


def _rows(t: pb.Tensor) -> int:
    return t.shape[0] if t.shape else 0


def _lease(request) -> dict:
    """A read request's lease, as the shard's keyword (none: nothing, for any ShardHandle)."""
    return {"lease": request.lease} if request.lease else {}


class KnowledgeStoreServicer(pb_grpc.KnowledgeStoreServicer):
    def __init__(self, rpc: _Rpc, data_paths: dict[str, datapath.DataPathServer] | None = None,
                 fetch_chunk_bytes: int = DEFAULT_FETCH_CHUNK_MB << 20):
        self._rpc = rpc
        self._shard = rpc.shard
        self._data_paths = data_paths or {}
        self._fetch_chunk_bytes = fetch_chunk_bytes
        self._waiters = threading.BoundedSemaphore(rpc.limits.max_barrier_waiters)

    @property
    def _device(self) -> torch.device:
        # Where compacted readouts are expanded: beside the shard's rows when it says where.
        return getattr(self._shard, "device", torch.device("cpu"))

    def Describe(self, request, context):
        return self._rpc.handle("Describe", context, lambda: wire.description_to_proto(self._shard.describe()))

    def Search(self, request, context):
        # Registered with pass-through (de)serializers (_RawHandlers): the request arrives as
        # bytes, its queries read in place, and the answer leaves as bytes (wire_search).
        rows = [0]

        def call():
            req, at = (wire_search.split_search_request(request) if isinstance(request, bytes)
                       else (request, None))
            rows[0] = _rows(req.queries)
            guard.search(req, self._rpc.limits, self._rpc.dims()[0])
            if isinstance(request, bytes):
                queries, options = wire_search.search_request_from_split(req, at)
                queries = wire_search.aligned_for(queries, torch.device(self._device))
            else:
                queries, options = wire.search_request_from_proto(req)
            res = self._shard.search(queries, int(req.k), **options, version=req.version)
            return wire_search.encode_search_result(res)
        return self._rpc.handle("Search", context, call, items=lambda: rows[0])

    def Fetch(self, request, context):
        def call():
            self._check_fetch(request, context)
            ids, out_dtype, usage = wire.fetch_request_from_proto(request)
            values = self._shard.fetch(ids, version=request.version, **usage, **_lease(request))
            resp = pb.FetchResponse()
            wire.to_proto(values if out_dtype is None else values.to(out_dtype), resp.values)
            return resp
        return self._rpc.handle("Fetch", context, call, items=_rows(request.ids))

    def _check_fetch(self, request, context) -> None:
        """Fetch and FetchStream: usage counts make it a training call; the rows are bounded."""
        if request.HasField("hits") or request.HasField("weight_sum"):
            self._rpc.authority.require(auth.TRAIN, context.invocation_metadata())
        _, d_v, itemsize = self._rpc.dims()
        guard.fetch(request, self._rpc.limits, d_v, itemsize)

    def FetchStream(self, request, context):
        # The rows are gathered in one piece (one version, one lock), then sent as pieces of
        # about fetch_chunk_bytes, each encoded as raw bytes (wire_chunks: registered with a
        # pass-through serializer, see _RawFetchStream). Bounded as Fetch is: the whole answer
        # is held at once.
        def call():
            self._check_fetch(request, context)
            ids, out_dtype, usage = wire.fetch_request_from_proto(request)
            if request.chunk_rows < 0:
                raise errors.InvalidArgument("chunk_rows", f"must be >= 0, got {request.chunk_rows}")
            values = self._shard.fetch(ids, version=request.version, **usage, **_lease(request))
            values = values if out_dtype is None else values.to(out_dtype)
            if values.device.type != "cpu":   # through page-locked memory, as wire.to_proto does
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                values = host.copy_(values)
            return values
        values = self._rpc.handle("FetchStream", context, call, items=_rows(request.ids))
        row_bytes = max(1, values[0].numel() * values.element_size()) if values.shape[0] else 1
        chunk = max(1, self._fetch_chunk_bytes // row_bytes)
        if request.chunk_rows:
            chunk = min(int(request.chunk_rows), chunk)   # the client may ask for smaller pieces, never larger
        for start in range(0, max(values.shape[0], 1), chunk):
            yield wire_chunks.encode_chunk(start, values[start:start + chunk])

    def OpenDataPath(self, request, context):
        # Handles of a faster transport go only to callers with credentials (the read role,
        # auth.RPC_ROLES; each call on the path then needs its own role); `open` decides
        # whether it can serve this pair.
        def call():
            if len(request.kinds) > _MAX_TRANSPORT_KINDS:
                raise errors.InvalidArgument("kinds", f"more than {_MAX_TRANSPORT_KINDS}")
            for kind, offer in request.offers.items():
                if len(offer.values) > _MAX_PARAMS or any(len(k) + len(v) > _MAX_PARAM_CHARS
                                                          for k, v in offer.values.items()):
                    raise errors.InvalidArgument(f"offers[{kind[:32]}]", f"at most {_MAX_PARAMS} parameters "
                                                                         f"of {_MAX_PARAM_CHARS} characters")
            client = wire.endpoint_from_proto(request.client, "client")
            me = datapath.local_endpoint(self._device)
            resp = pb.OpenDataPathResponse(server=wire.endpoint_to_proto(me))
            for kind in request.kinds:
                server = self._data_paths.get(kind)
                params = None if server is None else server.open(
                    client, me, dict(request.offers[kind].values) if kind in request.offers else {})
                if params is not None:
                    resp.kind = kind
                    resp.params.values.update(params)
                    break
            return resp
        return self._rpc.handle("OpenDataPath", context, call)

    def AccumulateValueGrads(self, request, context):
        def call():
            guard.rows(request.ids, self._rpc.limits, "ids")
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            grads = wire.from_proto(request.grads, "grads", dtypes=_WIRE_FLOATS, ndim=2).float()
            self._shard.accumulate_value_grads(ids, grads, request_id=request.request_id, version=request.version)
            return pb.AccumulateValueGradsResponse()
        return self._rpc.handle("AccumulateValueGrads", context, call, items=_rows(request.ids))

    def Readout(self, request, context):
        def call():
            guard.readout(request, self._rpc.limits, self._rpc.dims()[1], backward=False)
            mask, ids, weights = wire.readout_entries_from_proto(request, self._device)
            out_dtype = wire.readout_wire_dtype(request.out_dtype, "out_dtype")
            resp = pb.ReadoutResponse()
            out = self._shard.readout(ids, weights, version=request.version, **_lease(request))
            wire.to_proto(out.to(out_dtype), resp.out)
            return resp
        return self._rpc.handle("Readout", context, call, items=wire.readout_tokens(request))

    def ReadoutBackward(self, request, context):
        # request_id is passed to the shard, which owns the dedup of row-gradient accumulation.
        def call():
            guard.readout(request, self._rpc.limits, self._rpc.dims()[1], backward=True)
            mask, ids, weights = wire.readout_entries_from_proto(request, self._device)
            grad_out = wire.from_proto(request.grad_out, "grad_out", dtypes=_WIRE_FLOATS, ndim=2).float()
            grad_w = self._shard.readout_backward(ids, weights, grad_out, request_id=request.request_id,
                                                  version=request.version)
            resp = pb.ReadoutBackwardResponse()
            wire.to_proto(grad_w if mask is None else grad_w[mask.to(grad_w.device)], resp.grad_weights)
            return resp
        return self._rpc.handle("ReadoutBackward", context, call, items=wire.readout_tokens(request))

    def AccumulateKeyGrads(self, request, context):
        def call():
            guard.rows(request.ids, self._rpc.limits, "ids")
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            grads = wire.from_proto(request.grads, "grads", dtypes=_FLOATS, ndim=2)
            self._shard.accumulate_key_grads(ids, grads, request_id=request.request_id, version=request.version)
            return pb.AccumulateKeyGradsResponse()
        return self._rpc.handle("AccumulateKeyGrads", context, call)

    def LeaseVersion(self, request, context):
        # A read of several pieces pins its version (store_service/leases.py). The caller whose
        # cap it counts against: the transport session it names (its leases go when the session
        # does, e.g. its process died), else this connection (its leases lapse at their deadline).
        def call():
            if not hasattr(self._shard, "lease_version"):
                raise errors.FailedPrecondition("this shard keeps no version leases")
            holder = f"peer:{context.peer()}"
            if request.session:
                SessionTable.of(self._shard).get(request.session)   # NotFound: not a session of this shard
                holder = f"session:{request.session}"
            lease, version = self._shard.lease_version(int(request.version), holder=holder, ttl_s=request.ttl_s)
            return pb.LeaseResponse(lease=lease, version=version)
        return self._rpc.handle("LeaseVersion", context, call)

    def ReleaseLease(self, request, context):
        # The lease id is the capability (128 random bits): an unknown one changes nothing.
        def call():
            if hasattr(self._shard, "release_lease"):
                self._shard.release_lease(request.lease)
            return pb.ReleaseLeaseResponse()
        return self._rpc.handle("ReleaseLease", context, call)

    def EndStep(self, request, context):
        # A barrier wait holds a handler thread for up to timeout_s: at most
        # limits.max_barrier_waiters of them at once, on threads added for them (serve_shard),
        # so reads and health checks always keep their own threads.
        def call():
            timeout_s = validation.barrier_timeout(request.timeout_s, self._rpc.limits)
            if not self._waiters.acquire(blocking=False):
                raise errors.ResourceExhausted("max_barrier_waiters", "EndStep calls waiting at once exceed the "
                                               f"limit max_barrier_waiters={self._rpc.limits.max_barrier_waiters}")
            try:
                step = self._shard.end_step(int(request.step), worker=int(request.worker),
                                            num_workers=int(request.num_workers),
                                            request_id=request.request_id, timeout_s=timeout_s,
                                            active=context.is_active)
            finally:
                self._waiters.release()
            return pb.EndStepResponse(step=step)
        return self._rpc.handle("EndStep", context, call)


@dataclass
class ShardServer:
    """A running shard server. `stop()` shuts gRPC and the metrics endpoint down."""
    server: grpc.Server
    host: str
    port: int
    health: health.HealthServicer
    metrics: ServerMetrics
    metrics_port: int | None = None
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    data_paths: dict = field(default_factory=dict)   # kind -> DataPathServer
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
        for close in self.on_stop:
            close()
        for server in self.data_paths.values():
            server.close()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> "ShardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _RawFetchStream:
    """Registers the generated KnowledgeStore handlers on `server`, FetchStream's with a
    pass-through serializer: its servicer yields FetchChunk messages already encoded as
    bytes (wire_chunks.encode_chunk), which protobuf would otherwise copy twice more; and
    Search's with pass-through (de)serializers (store_service/wire_search.py)."""

    def __init__(self, server: grpc.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers arrive next, by name, in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        handlers = dict(handlers)
        h = handlers["FetchStream"]
        handlers["FetchStream"] = grpc.unary_stream_rpc_method_handler(
            h.unary_stream, request_deserializer=h.request_deserializer, response_serializer=None)
        # Search: bytes both ways (wire_search reads the queries in place and writes the answer).
        handlers["Search"] = grpc.unary_unary_rpc_method_handler(
            handlers["Search"].unary_unary, request_deserializer=None, response_serializer=None)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)


def serve_shard(shard: ShardHandle, port: int = 0, *, admin_token: str = "", tokens: auth.Tokens | None = None,
                host: str = "127.0.0.1", metrics_port: int | None = None,
                max_message_mb: int = DEFAULT_MAX_MESSAGE_MB, max_workers: int = 8,
                limits: Limits | None = None, tls: ServerTls | None = None,
                store_root: str | None = None, data_paths: Sequence[str] = (),
                fetch_chunk_mb: float = DEFAULT_FETCH_CHUNK_MB) -> ShardServer:
    """Serve `shard` over gRPC on host:port (0: a free port); returns the running server.

    tokens: the bearer token of each role (store_service/auth.py); admin_token alone
    means Tokens(admin=admin_token), one token for everything. limits: the bounds of
    store_service/limits.py (default Limits()). tls: serve over TLS (mutual TLS when it has
    a client CA) instead of plaintext. store_root: the only tree admin paths may name
    (default: where the shard was loaded from). metrics_port: None for no metrics
    endpoint, 0 for a free port. Requests larger than max_message_mb are refused by gRPC
    with RESOURCE_EXHAUSTED before they reach the shard. data_paths: faster transports this
    server offers beside gRPC (store_service/datapath.py). fetch_chunk_mb: the size of a
    FetchStream piece.
    """
    if tokens is None:
        if not admin_token:
            raise ValueError("serve_shard needs tokens or a non-empty admin_token")
        tokens = auth.Tokens(admin=admin_token)
    if not fetch_chunk_mb > 0:
        raise ValueError(f"fetch_chunk_mb must be > 0, got {fetch_chunk_mb}")
    limits = limits or Limits()
    if hasattr(shard, "limits"):
        shard.limits = limits
    store_root = store_root if store_root is not None else getattr(shard, "store_root", None)
    if store_root is not None:
        persistence.clean_staging(store_root)   # what crashed publishers left (never a live one's)
    transports = {kind: datapath.transport(kind).server(shard) for kind in data_paths}
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

    authority = auth.Authority(tokens)
    rpc = _Rpc(shard, authority, metrics, refresh_health, limits, store_root)
    limit = max_message_mb * 1024 * 1024
    interceptor = auth.AuthInterceptor(authority, lambda e: status_of(e, limits.max_error_chars),
                                       lambda method, code: metrics.observe(method, code, 0.0))
    server = grpc.server(
        # barrier waits get threads of their own (KnowledgeStoreServicer.EndStep)
        futures.ThreadPoolExecutor(max_workers=max_workers + limits.max_barrier_waiters,
                                   thread_name_prefix="kstore-rpc"),
        interceptors=[interceptor],
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", -1),
                 ("grpc.so_reuseport", 0)])
    servicer = KnowledgeStoreServicer(rpc, transports, int(fetch_chunk_mb * (1 << 20)))
    pb_grpc.add_KnowledgeStoreServicer_to_server(servicer, _RawFetchStream(server))
    pb_grpc.add_StoreAdminServicer_to_server(StoreAdminServicer(rpc), server)
    transport = add_transport_service(server, rpc, host)   # the bulk data path (store_service.transport)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (STORE_SERVICE, ADMIN_SERVICE, TRANSPORT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(bind, tls.credentials()) if tls is not None else server.add_insecure_port(bind)
    if bound == 0:
        raise RuntimeError(f"could not bind {bind}")
    refresh_health()
    server.start()
    handle = ShardServer(server=server, host=host, port=bound, health=health_servicer, metrics=metrics,
                         on_stop=[transport.close], data_paths=transports)
    if metrics_port is not None:
        handle.metrics_port = metrics.serve_http(metrics_port, addr=host if ":" not in host else "::")
    return handle
