"""The shard's `StoreTransport` service: sessions of the bulk data path and the calls that
move a tensor through one (protos/knowledge_store.proto says the contract).

Every call goes through the server's `_Rpc.handle` like any other: errors mapped to status
codes in the one place, metrics kept. Who may call is checked before, by the server's
interceptor, from the one table of roles (`store_service.auth.RPC_ROLES`: Open, Close,
Fetch, Readout need read; ReadoutBackward, PushGrads need train; a Fetch with usage counts
needs train, checked here as the store's Fetch does).

    add_transport_service(grpc_server, rpc, host="127.0.0.1")   # in serve_shard
"""
from __future__ import annotations

import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import auth, errors, guard, wire
from store_service.transport.config import ServerLimits
from store_service.transport.registry import SessionTable

SERVICE = "knowledge_store.v1.StoreTransport"

# The role each call needs: auth.RPC_ROLES, the one table. Besides its role, every call but
# Open names a session, a 128-bit capability that only an authorized Open (or the store's
# OpenDataPath) hands out: an unknown session is NOT_FOUND and touches nothing.
ROLES = {m.rsplit("/", 1)[-1]: role for m, role in auth.RPC_ROLES.items() if m.startswith(f"/{SERVICE}/")}
SESSION = {"Close", "Fetch", "Readout", "ReadoutBackward", "PushGrads"}

_GRAD_DTYPES = {"value": ("float32", "bfloat16"), "key": ("float32",)}


class StoreTransportServicer(pb_grpc.StoreTransportServicer):
    def __init__(self, rpc, host: str, limits: ServerLimits = ServerLimits()):
        self._rpc = rpc
        self._shard = rpc.shard
        self._table = SessionTable.of(rpc.shard, host, limits)
        self._dims: dict | None = None

    @property
    def _d(self) -> dict:
        """Row widths and the value dtype: fixed for a table's life (a swap keeps the layout)."""
        if self._dims is None:
            d = self._shard.describe()
            self._dims = {"value": d.d_v, "key": d.d_k, "dtype": wire.DTYPES[d.value_dtype]}
        return self._dims

    @property
    def _device(self) -> torch.device:
        return self._table.device

    def _call(self, method: str, context, call, items: int = 0):
        # The caller's role was checked by the server's interceptor (auth.RPC_ROLES) before this.
        return self._rpc.handle(f"Transport.{method}", context, call, items=items)

    def Open(self, request, context):
        def call():
            p = self._table.open(request.kind, request.host_id, request.buffer_bytes, request.backend)
            return pb.OpenTransportResponse(**p)
        return self._call("Open", context, call)

    def Close(self, request, context):
        def call():
            self._table.close(request.session)
            return pb.CloseTransportResponse()
        return self._call("Close", context, call)

    def close(self) -> None:
        self._table.close_all()

    def _session(self, sid: str):
        return self._table.get(sid)

    # -- moving tensors ----------------------------------------------------------------

    def Fetch(self, request, context):
        def call():
            f = request.fetch
            if f.HasField("hits") or f.HasField("weight_sum"):   # usage counts: a training call
                self._rpc.authority.require(auth.TRAIN, context.invocation_metadata())
            session = self._session(request.at.session)
            ids, out_dtype, usage = wire.fetch_request_from_proto(request.fetch)
            dtype = out_dtype or self._d["dtype"]
            out = session.out_tensor(request.at, dtype, (ids.shape[0], self._d["value"]), self._device)
            version, step = _fetch_into(self._shard, ids, out, usage, request.fetch.version, request.fetch.lease)
            session.sent(request.at, out)
            resp = pb.PlacedFetchResponse(version=version, step=step)
            resp.values.dtype, resp.values.shape[:] = wire.dtype_name(dtype), out.shape
            return resp
        return self._call("Fetch", context, call, items=len(request.fetch.ids.shape) and request.fetch.ids.shape[0])

    def Readout(self, request, context):
        def call():
            guard.readout(request.readout, self._rpc.limits, self._d["value"], backward=False)
            session = self._session(request.at.session)
            _, ids, weights = wire.readout_entries_from_proto(request.readout, self._device)
            dtype = wire.readout_wire_dtype(request.readout.out_dtype, "out_dtype")
            version = request.readout.version or _serving(self._shard)
            out = session.out_tensor(request.at, dtype, (ids.shape[0], self._d["value"]), self._device)
            lease = {"lease": request.readout.lease} if request.readout.lease else {}
            out.copy_(self._shard.readout(ids, weights, version=version, **lease))
            session.sent(request.at, out)
            resp = pb.PlacedReadoutResponse(version=version)
            resp.out.dtype, resp.out.shape[:] = wire.dtype_name(dtype), out.shape
            return resp
        return self._call("Readout", context, call, items=wire.readout_tokens(request.readout))

    def ReadoutBackward(self, request, context):
        # request_id goes to the shard, which owns the dedup of row-gradient accumulation.
        def call():
            guard.readout(request.backward, self._rpc.limits, self._d["value"], backward=True)
            session = self._session(request.at.session)
            rb = request.backward
            mask, ids, weights = wire.readout_entries_from_proto(rb, self._device)
            g = rb.grad_out
            if g.dtype not in _GRAD_DTYPES["value"] or list(g.shape) != [ids.shape[0], self._d["value"]]:
                raise errors.InvalidArgument("grad_out", f"expected float32 or bfloat16 [{ids.shape[0]}, "
                                                         f"{self._d['value']}], got {g.dtype} {list(g.shape)}")
            grad_out = session.in_tensor(request.at, wire.DTYPES[g.dtype], tuple(g.shape), self._device).float()
            grad_w = self._shard.readout_backward(ids, weights, grad_out, request_id=rb.request_id,
                                                  version=rb.version)
            resp = pb.ReadoutBackwardResponse()
            wire.to_proto(grad_w if mask is None else grad_w[mask.to(grad_w.device)], resp.grad_weights)
            return resp
        return self._call("ReadoutBackward", context, call, items=wire.readout_tokens(request.backward))

    def PushGrads(self, request, context):
        def call():
            session = self._session(request.at.session)
            kind = request.kind
            if kind not in _GRAD_DTYPES:
                raise errors.InvalidArgument("kind", f"{kind!r}; use 'value' or 'key'")
            ids = wire.from_proto(request.ids, "ids", ids=True, ndim=1)
            g = request.grads
            if g.dtype not in _GRAD_DTYPES[kind] or list(g.shape) != [ids.shape[0], self._d[kind]]:
                raise errors.InvalidArgument("grads", f"expected {' or '.join(_GRAD_DTYPES[kind])} "
                                                      f"[{ids.shape[0]}, {self._d[kind]}], got {g.dtype} {list(g.shape)}")
            grads = session.in_tensor(request.at, wire.DTYPES[g.dtype], tuple(g.shape), self._device).float()
            push = (self._shard.accumulate_value_grads if kind == "value" else self._shard.accumulate_key_grads)
            push(ids, grads, request_id=request.request_id, version=request.version)
            return pb.PlacedGradsResponse()
        return self._call("PushGrads", context, call, items=len(request.ids.shape) and request.ids.shape[0])


def _serving(shard) -> int:
    v = getattr(shard, "serving_version", None)
    return int(v) if v is not None else shard.describe().info.version


def _fetch_into(shard, ids, out, usage, version, lease="") -> tuple[int, int]:
    """Rows into `out` under one lock where the shard can (`Shard.fetch_into`), else a fetch
    of the version pinned first, then a copy. lease: the read's version lease, if any."""
    leased = {"lease": lease} if lease else {}
    if hasattr(shard, "fetch_into"):
        return shard.fetch_into(ids, out, **usage, version=version, **leased)
    version = version or _serving(shard)
    out.copy_(shard.fetch(ids, **usage, version=version, **leased))
    return version, -1


def add_transport_service(server, rpc, host: str, limits: ServerLimits = ServerLimits()) -> StoreTransportServicer:
    servicer = StoreTransportServicer(rpc, host, limits)
    pb_grpc.add_StoreTransportServicer_to_server(servicer, server)
    return servicer
