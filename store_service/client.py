"""`RemoteShard`: a `ShardHandle` over gRPC, and `connect`, a `Table` over remote shards.

The client mirrors the domain interface, so `Table` scatters over RemoteShards
exactly as over in-process Shards (its executor runs the calls in parallel).
Status codes become domain errors in exactly one place, `error_from_rpc`.

    table = connect(["127.0.0.1:50051", "127.0.0.1:50052"], admin_token="secret")
    res = table.search(queries, k=32)

Transient failures (UNAVAILABLE) are retried with exponential backoff within the
call's deadline; when that runs out the call raises `errors.ShardUnavailable`
naming the shard and its address. Mutations carry a request_id that stays the
same across retries, so a retried mutation is applied once.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from typing import Mapping, Sequence

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import datapath, errors, wire
from store_service.grpc_datapath import GrpcDataPath, WireConfig
from store_service.status import MD_LIMIT
from store_service.tls import ClientTls
from store_service.interface import SearchResult, ShardDescription, SideQuery, TagFilter, UsageStats
from store_service.optimizer import OptimizerConfig, RowOptimizer
from store_service.wire import (MD_AUTHORIZATION, MD_ERROR, MD_FIELD, MD_REQUESTED_VERSION, MD_SERVING_VERSION,
                                MD_STALE_REASON, STORE_SERVICE)

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),     # the server enforces its own limit
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),               # retries are ours, below, within one deadline
    ("grpc.use_local_subchannel_pool", 1),    # each channel of a shard's pool its own TCP connection
    # A restarted shard is reached again within a fraction of a second (gRPC's default
    # reconnect backoff grows to minutes); a retry after UNAVAILABLE also opens fresh channels.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
_MAX_BACKOFF_S = 0.25   # between retries of an UNAVAILABLE call

log = logging.getLogger(__name__)


def error_from_rpc(err: grpc.RpcError, shard_id: int, address: str) -> errors.StoreError:
    """Status code (+ trailing metadata) -> domain error. The one mapping back."""
    code = err.code()
    details = err.details() or ""
    md = dict(err.trailing_metadata() or ())
    kind = md.get(MD_ERROR, "")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = md.get(MD_FIELD, "request")
        prefix = f"{field}: "
        return errors.InvalidArgument(field, details[len(prefix):] if details.startswith(prefix) else details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(md.get(MD_LIMIT, "max_message_mb"),
                                        f"shard {shard_id} at {address}: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return errors.PermissionDenied(details)
    if code == grpc.StatusCode.DATA_LOSS:
        return errors.DataLoss(f"shard {shard_id} at {address}", details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if kind == "stale-version":
            return errors.StaleVersion(int(md[MD_REQUESTED_VERSION]), int(md[MD_SERVING_VERSION]),
                                       md.get(MD_STALE_REASON, ""))
        return errors.FailedPrecondition(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFound(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unauthenticated(details)
    return errors.ShardUnavailable(shard_id, address, f"{code.name}: {details}")


class RemoteShard:
    """A shard served by `store_service.server.serve_shard` at `address` ("host:port")."""

    def __init__(self, address: str, *, admin_token: str = "", token: str = "", timeout_s: float = 30.0,
                 retries: int = 5, shard_id: int = -1, backoff_s: float = 0.05,
                 interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
                 compact_readout: bool = True, readout_wire_dtype: str = "float32",
                 readout_chunk_rows: int = 0, wire_config: WireConfig | None = None,
                 data_paths: Sequence[str] = (), device: str | torch.device = "cpu",
                 tls: ClientTls | None = None, store_root: str | None = None,
                 reconnect_window_s: float = 10.0):
        """token: the bearer token sent with every call (any role, store_service/auth.py);
        admin_token: the same, kept for callers that name it so (token wins when both are
        given). tls: connect over TLS (mutual TLS when it has a client certificate): every
        channel of the pool, and a faster data path's own channel, use it.
        store_root: the store root as this client sees it; absolute admin paths under it are
        sent relative to it (servers take only relative paths).
        timeout_s: deadline of one call, retries included. retries: how many times an
        UNAVAILABLE call is retried at least; it goes on being retried (each time on fresh
        channels) for reconnect_window_s, within the deadline, while a restarted server comes
        back. interceptors: client interceptors
        (tracing, byte counting) wrapped around the channel.
        compact_readout: send a readout only the (token, slot) entries this shard owns, with
        a bit mask of where they go (DESIGN.md section 3's O(d_v + k) bytes, k counted per
        shard), instead of the full [T, k] grid with the others as -1; the numbers are the same.
        readout_wire_dtype: "float32" (exact: remote = in-process) or "bfloat16", which halves
        the d_v-wide tensors (partial readouts, fetched values, their gradients) on the wire;
        the shard still sums and accumulates in float32.
        readout_chunk_rows: split a readout of more rows than this into calls of at most this
        many, all in flight at once (0: one call), so that encoding, transport and the
        shard's work on different pieces overlap; the numbers are the same.
        wire_config: the gRPC data path's channel pool and how it splits large calls.
        data_paths: faster transports to try for fetch, readout and row gradients, preferred
        first (store_service/datapath.py: e.g. "cuda_ipc", "shm"); the first the server
        offers for this pair of endpoints is used, else gRPC. device: where this caller
        wants rows (a same-host GPU transport may deliver them there)."""
        if readout_chunk_rows < 0:
            raise errors.InvalidArgument("readout_chunk_rows", f"must be >= 0, got {readout_chunk_rows}")
        if readout_wire_dtype not in wire.READOUT_WIRE_DTYPES:
            raise errors.InvalidArgument("readout_wire_dtype", f"{readout_wire_dtype!r}; use one of "
                                                               f"{sorted(wire.READOUT_WIRE_DTYPES)}")
        self.compact_readout = compact_readout
        self.readout_chunk_rows = readout_chunk_rows
        self.readout_wire_dtype = readout_wire_dtype
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._shard_id = shard_id  # learned from describe() when not given
        token = token or admin_token
        self._md = ((MD_AUTHORIZATION, wire.bearer(token)),) if token else ()
        self.data_metadata = self._md   # credentials of data-plane calls (GrpcDataPath's streams)
        self._tls, self._interceptors, self.store_root = tls, tuple(interceptors), store_root
        self.reconnect_window_s = reconnect_window_s
        self.wire_config = wire_config or WireConfig()
        self._channel_lock = threading.Lock()
        self._old_channels: list[grpc.Channel] = []
        self._raw_channels: list[grpc.Channel] = []
        self._grpc_path = None
        self._open_channels()
        self.device = str(device)
        self._data_path_kinds = tuple(data_paths)
        self._grpc_path = GrpcDataPath(self, self.wire_config)
        self._path: datapath.DataPath | None = None if self._data_path_kinds else self._grpc_path
        self._path_lock = threading.Lock()

    def _make_channel(self) -> grpc.Channel:
        return (self._tls.channel(self.address, _CHANNEL_OPTIONS) if self._tls is not None
                else grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS))

    def _open_channels(self) -> None:
        """A fresh channel pool (and stubs over it). The ones replaced are closed only later
        (or with the shard handle): calls of other threads may still be in flight on them."""
        if self._raw_channels:
            self._old_channels += self._raw_channels
            while len(self._old_channels) > 4 * len(self._raw_channels):
                self._old_channels.pop(0).close()
        self._raw_channels = [self._make_channel() for _ in range(self.wire_config.channels)]
        self.channels = [grpc.intercept_channel(c, *self._interceptors) if self._interceptors else c
                         for c in self._raw_channels]
        self.store_stubs = [pb_grpc.KnowledgeStoreStub(c) for c in self.channels]
        self._store = self.store_stubs[0]
        self._admin = pb_grpc.StoreAdminStub(self.channels[0])
        self._health = health_pb2_grpc.HealthStub(self.channels[0])
        if self._grpc_path is not None:
            self._grpc_path.bind_channels()

    def reopen_channels(self) -> None:
        """A fresh channel pool after UNAVAILABLE (GrpcDataPath's streamed retries)."""
        with self._channel_lock:
            self._open_channels()

    def _stub(self, rpc):
        """The current pool's version of stub method `rpc` (after a reconnect the caller's
        bound method may belong to a replaced stub). A raw-bytes callable (GrpcDataPath's)
        is kept: its channel stays open, and the path has bound new ones for later calls."""
        method = getattr(rpc, "_method", None)
        if method is None or getattr(rpc, "_request_serializer", True) is None:
            return rpc
        method = method.decode() if isinstance(method, bytes) else method
        service = self._admin if "StoreAdmin" in method else (self._health if "Health" in method else self._store)
        return getattr(service, method.rsplit("/", 1)[-1], rpc)

    @property
    def shard_id(self) -> int:
        return self._shard_id

    def __repr__(self) -> str:
        return f"RemoteShard({self.address!r}, shard_id={self._shard_id})"

    def close(self) -> None:
        if self._path is not None and self._path is not self._grpc_path:
            self._path.close()
        self._grpc_path.close()
        with self._channel_lock:
            for c in self._old_channels + self._raw_channels:
                c.close()
            self._old_channels.clear()

    @property
    def data_path_kind(self) -> str:
        """The transport fetch, readout and row gradients use ("grpc" until chosen)."""
        return (self._path or self._grpc_path).kind

    def data_path(self) -> datapath.DataPath:
        """The data path of this pair, chosen on first use (OpenDataPath), gRPC as fallback."""
        if self._path is None:
            with self._path_lock:
                if self._path is None:
                    self._path = self._open_data_path()
        return self._path

    def _on_path(self, call):
        """call(path) on this pair's data path. A transport that lost its session (NotFound: the
        shard restarted) or its peer (ShardUnavailable) is dropped and the call made again over
        gRPC, so the caller sees what the gRPC path says (the same request id: a gradient is
        accumulated once); the next call opens a data path afresh."""
        path = self.data_path()
        if path is self._grpc_path:
            return call(path)
        try:
            return call(path)
        except (errors.NotFound, errors.ShardUnavailable) as exc:
            log.warning("shard %s at %s: %s path lost (%s); this call over gRPC", self._shard_id, self.address,
                        path.kind, exc)
            with self._path_lock:
                if self._path is path:
                    self._path = None
            try:
                path.close()
            except Exception:   # the peer may be gone: nothing to tell it
                pass
            return call(self._grpc_path)

    def _open_data_path(self) -> datapath.DataPath:
        known = datapath.transports()
        kinds = [k for k in self._data_path_kinds if k in known and known[k].available()]
        if not kinds:
            return self._grpc_path
        clients = {k: known[k].client() for k in kinds}
        me = datapath.local_endpoint(self.device)
        req = pb.OpenDataPathRequest(kinds=kinds, client=wire.endpoint_to_proto(me))
        for kind, client in clients.items():
            req.offers[kind].values.update(client.params(me))
        try:
            resp = self._call(self._store.OpenDataPath, req)
        except errors.ShardUnavailable as exc:
            if "UNIMPLEMENTED" not in str(exc):
                raise       # a dead peer is a dead peer, whichever path
            resp = pb.OpenDataPathResponse()
        if not resp.kind:
            log.info("shard %s at %s offers none of %s; using gRPC", self._shard_id, self.address, kinds)
            return self._grpc_path
        if resp.kind not in clients:
            raise errors.FailedPrecondition(f"shard {self._shard_id} chose transport {resp.kind!r}, not offered")
        try:
            return clients[resp.kind].connect(dict(resp.params.values), shard_id=self._shard_id,
                                              address=self.address, timeout_s=self.timeout_s,
                                              metadata=self._md, tls=self._tls)
        except Exception as exc:  # the fast path is an optimisation: fall back, say why
            log.warning("shard %s at %s: %s transport failed to connect (%s); using gRPC",
                        self._shard_id, self.address, resp.kind, exc)
            return self._grpc_path

    # -- the one place RPCs are made ------------------------------------------
    def call(self, rpc, request):
        """A data-plane call (retried, errors mapped): what GrpcDataPath uses."""
        return self._call(rpc, request)

    def domain_error(self, err: grpc.RpcError, attempt: int) -> errors.StoreError:
        domain = error_from_rpc(err, self._shard_id, self.address)
        if isinstance(domain, errors.ShardUnavailable):
            domain = errors.ShardUnavailable(self._shard_id, self.address,
                                             f"{err.code().name} after {attempt + 1} attempt(s): {err.details()}")
        return domain

    def _call(self, rpc, request, *, admin: bool = False, timeout_s: float | None = None):
        start = time.monotonic()
        deadline = start + (timeout_s if timeout_s is not None else self.timeout_s)
        metadata = self._md
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise errors.ShardUnavailable(self._shard_id, self.address, "deadline exceeded before the call")
                return (self._stub(rpc) if attempt else rpc)(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as err:
                pause = self.retry_pause(attempt, start, deadline) if err.code() == grpc.StatusCode.UNAVAILABLE else None
                if pause is not None:
                    attempt += 1
                    time.sleep(pause)
                    self.reopen_channels()   # a restarted server: do not wait out the old channel's backoff
                    continue
                raise self.domain_error(err, attempt) from None

    def retry_pause(self, attempt: int, start: float, deadline: float) -> float | None:
        """The pause before retrying an UNAVAILABLE call begun at `start` (monotonic) that has
        been retried `attempt` times, or None when it may not be retried: `retries` times, or
        any number within `reconnect_window_s`, capped backoff, never past `deadline`. The one
        rule for unary calls and GrpcDataPath's streamed parts."""
        if not (attempt < self.retries or time.monotonic() < start + self.reconnect_window_s):
            return None
        pause = min(self.backoff_s * (2 ** min(attempt, 8)), _MAX_BACKOFF_S) * (0.5 + random.random())
        return pause if time.monotonic() + pause < deadline else None

    def row_chunks(self, rows: int) -> list[slice]:
        step = self.readout_chunk_rows or rows
        return [slice(i, min(i + step, rows)) for i in range(0, max(rows, 1), max(step, 1))]

    # -- data plane ---------------------------------------------------------
    def describe(self) -> ShardDescription:
        d = wire.description_from_proto(self._call(self._store.Describe, pb.DescribeRequest()), self.address)
        self._shard_id = d.info.shard_id
        return d

    def search(self, queries: torch.Tensor, k: int, *, tags: Sequence[str] = (), where: TagFilter | None = None,
               side: SideQuery | None = None, want_keys: bool = False, version: int = 0) -> SearchResult:
        # Raw bytes both ways on the channel pool (store_service/wire_search.py).
        return self._grpc_path.search(queries, k, tags=tags, where=where, side=side, want_keys=want_keys,
                                      version=version)

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None, version: int = 0) -> torch.Tensor:
        # With a bfloat16 readout wire the values travel rounded to bfloat16 too (`Table.fetch`
        # hands them back in the table's value dtype).
        out_dtype = torch.bfloat16 if self.readout_wire_dtype == "bfloat16" else None
        return self._on_path(lambda p: p.fetch(ids, hits=hits, weight_sum=weight_sum, out_dtype=out_dtype,
                                               version=version))

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                               request_id: str = "", version: int = 0) -> None:
        grads = grads.to(wire.READOUT_WIRE_DTYPES[self.readout_wire_dtype])
        rid = request_id or _new_id()   # the same on a redo over gRPC: accumulated once
        self._on_path(lambda p: p.accumulate_value_grads(ids, grads, request_id=rid, version=version))

    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, version: int = 0) -> torch.Tensor:
        out_dtype = wire.READOUT_WIRE_DTYPES[self.readout_wire_dtype]
        return self._on_path(lambda p: p.readout(ids, weights, out_dtype=out_dtype, version=version)).float()

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "", version: int = 0) -> torch.Tensor:
        # An id of our own when the caller gives none, so a retry is not accumulated twice;
        # each piece of a chunked call has its own, derived from it. grad_out (the bulk payload)
        # goes through the pair's data path: a same-host buffer where one is open, else gRPC.
        grad_out = grad_out.to(wire.READOUT_WIRE_DTYPES[self.readout_wire_dtype])
        rid = request_id or _new_id()
        return self._on_path(lambda p: p.readout_backward(ids, weights, grad_out, request_id=rid,
                                                          version=version)).float()

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                             request_id: str = "", version: int = 0) -> None:
        req = pb.AccumulateKeyGradsRequest(version=version, request_id=request_id or _new_id())
        wire.ids_to_proto(ids, req.ids)
        wire.to_proto(grads, req.grads)
        self._call(self._store.AccumulateKeyGrads, req)

    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1,
                 request_id: str = "", timeout_s: float = 60.0) -> int:
        req = pb.EndStepRequest(step=step, worker=worker, num_workers=num_workers,
                                request_id=request_id or _new_id(), timeout_s=timeout_s)
        # The barrier may wait timeout_s for other workers; the RPC deadline covers that.
        return int(self._call(self._store.EndStep, req, timeout_s=timeout_s + self.timeout_s).step)

    # -- control plane (bearer token) ----------------------------------------
    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tags: Mapping[str, torch.Tensor] | None = None, partition: torch.Tensor | int = 0
                 ) -> torch.Tensor:
        req = wire.add_rows_to_proto(pb.AddRowsRequest(request_id=_new_id()), values, keys, bias, tags, partition)
        return wire.from_proto(self._call(self._admin.AddRows, req, admin=True).ids, "ids", ids=True)

    def set_optimizer(self, optimizer: OptimizerConfig, *, bias_step: float | None = None) -> RowOptimizer:
        req = pb.SetOptimizerRequest(request_id=_new_id())
        wire.optimizer_to_proto(optimizer, req.optimizer)
        if bias_step is not None:
            req.bias_step = bias_step
        return wire.row_optimizer_from_proto(self._call(self._admin.SetOptimizer, req, admin=True))

    def set_frozen(self, ids: torch.Tensor, frozen: bool) -> None:
        req = pb.SetFlagRequest(request_id=_new_id(), value=frozen)
        wire.ids_to_proto(torch.as_tensor(ids, dtype=torch.int64), req.ids)
        self._call(self._admin.SetFrozen, req, admin=True)

    def set_ablated(self, ids: torch.Tensor, ablated: bool) -> None:
        req = pb.SetFlagRequest(request_id=_new_id(), value=ablated)
        wire.ids_to_proto(torch.as_tensor(ids, dtype=torch.int64), req.ids)
        self._call(self._admin.SetAblated, req, admin=True)

    def usage(self) -> UsageStats:
        return wire.usage_from_proto(self._call(self._admin.Usage, pb.UsageRequest(), admin=True))

    def _relative(self, path: str) -> str:
        """An absolute path under this client's store root -> relative to it (servers refuse others)."""
        path = str(path)
        if self.store_root is None or not os.path.isabs(path):
            return path
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(self.store_root))
        return "" if rel == "." else (path if rel.startswith("..") else rel)

    def write_snapshot(self, version_dir: str, version: int, *, full: bool = False) -> None:
        req = pb.WriteSnapshotRequest(request_id=_new_id(), version_dir=self._relative(version_dir), version=version,
                                      full=bool(full))
        self._call(self._admin.WriteSnapshot, req, admin=True)

    def prepare_version(self, store_root: str, version: int) -> None:
        req = pb.PrepareVersionRequest(request_id=_new_id(), store_root=self._relative(store_root), version=version)
        self._call(self._admin.PrepareVersion, req, admin=True)

    def flip_version(self, version: int) -> None:
        self._call(self._admin.FlipVersion, pb.FlipVersionRequest(request_id=_new_id(), version=version), admin=True)

    def relabel_version(self, version: int, new_version: int) -> int:
        req = pb.RelabelVersionRequest(request_id=_new_id(), version=version, new_version=new_version)
        return int(self._call(self._admin.RelabelVersion, req, admin=True).relabelled)

    def release_version(self, version: int) -> None:
        req = pb.ReleaseVersionRequest(request_id=_new_id(), version=version)
        self._call(self._admin.ReleaseVersion, req, admin=True)

    def health(self) -> bool:
        """The standard gRPC health check of the KnowledgeStore service."""
        try:
            r = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=STORE_SERVICE),
                           timeout_s=min(self.timeout_s, 5.0))
        except errors.StoreError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING


def _new_id() -> str:
    return uuid.uuid4().hex


def connect(addresses: Sequence[str], *, admin_token: str = "", token: str = "", timeout_s: float = 30.0,
            retries: int = 5, interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
            compact_readout: bool = True, readout_wire_dtype: str = "float32", readout_chunk_rows: int = 0,
            wire_config: WireConfig | None = None, data_paths: Sequence[str] = (),
            device: str | torch.device = "cpu", tls: ClientTls | None = None, **table_kwargs):
    """A `Table` over the shard servers at `addresses` (one per shard, any order).
    token/admin_token, tls, compact_readout, readout_wire_dtype, readout_chunk_rows, wire_config,
    data_paths, device: see RemoteShard.
    table_kwargs go to `Table` (e.g. store_root=..., needed for snapshot and load_version)."""
    from store_service.table import Table

    shards = [RemoteShard(a, admin_token=admin_token, token=token, timeout_s=timeout_s, retries=retries,
                          interceptors=interceptors, compact_readout=compact_readout,
                          readout_wire_dtype=readout_wire_dtype, readout_chunk_rows=readout_chunk_rows,
                          wire_config=wire_config, data_paths=data_paths, device=device,
                          tls=tls, store_root=table_kwargs.get("store_root"))
              for a in addresses]
    return Table(shards, **table_kwargs)
