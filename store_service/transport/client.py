"""The client's side of the bulk data path: one session of one kind with one shard, with
the calls a remote shard's bulk tensors go through (fetch, readout, gradients).

    path = BulkPath.open("127.0.0.1:50051", token, "shm")   # Unauthenticated / FailedPrecondition
    rows = path.fetch(ids)                                    # bitwise what Shard.fetch returns
    path = open_path(address, token, ClientConfig())          # the first kind granted, or None

A tensor larger than a slot goes as several pieces (`slots.run`). Versions: the pieces of
one call are read from one version, pinned by a lease (store_service/leases.py: the shard keeps
it until the read releases it, so a swap landing between two pieces costs nothing), at one
step (each piece says its step; a call whose pieces disagree is read again, up to
`ClientConfig.retries` times), so an answer never mixes versions or steps. Without a lease (a
shard that keeps none, or `ClientConfig.lease` off) the first piece's version is named in every
later one, and a swap that releases it mid-read costs a re-read.
"""
from __future__ import annotations

import contextlib
import threading

import grpc
import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, wire
from store_service.client import error_from_rpc
from store_service.transport import handoff, hostid, slots
from store_service.transport.config import ClientConfig
from store_service.transport.ends import CudaEnd, DistEnd, ShmEnd

_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.enable_retries", 0)]


class _Done:
    """A call made at once, blocking, with a future's `result()`: the blocking call skips the
    completion-queue thread handoff a future pays (it dominates small calls), and a call kept
    alone in flight gains nothing from a future."""

    def __init__(self, rpc, req, timeout: float, metadata):
        self._value, self._error = None, None
        try:
            self._value = rpc(req, timeout=timeout, metadata=metadata)
        except grpc.RpcError as err:
            self._error = err

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


class BulkPath:
    def __init__(self, address: str, channel, end, session: str, max_bytes: int, description,
                 config: ClientConfig, metadata: tuple = ()):
        self.address, self.kind, self.config = address, end.kind, config
        # The bearer token goes with every call (store_service/auth.py: a session id alone is
        # not enough; each call also needs its role).
        self._channel, self._md, self._end = channel, tuple(metadata), end
        self._session = session
        self._stub = pb_grpc.StoreTransportStub(channel)
        self._store = pb_grpc.KnowledgeStoreStub(channel)
        self._leases = config.lease          # off once the shard says it keeps none
        self.rereads = 0                     # reads started again (a swap or step between pieces)
        self.shard_id = description.info.shard_id
        self.d_v, self.d_k = description.d_v, description.d_k
        self.value_dtype = wire.DTYPES[description.value_dtype]
        nbytes = max_bytes if end.kind == "torch_dist" else end.nbytes
        self._slots = slots.Slots(nbytes, config.slots, tagged=end.kind == "torch_dist")
        # NCCL pairs sends and receives in order, not by tag: one call, one piece at a time.
        self._ordered = end.kind == "torch_dist" and config.dist_backend == "nccl"
        self._one_at_a_time = threading.Lock()

    @classmethod
    def open(cls, address: str, token: str, kind: str, config: ClientConfig = ClientConfig(),
             tls=None) -> "BulkPath":
        """A session of `kind` with the shard at `address`, opened with the credentials `token`.
        Unauthenticated without valid credentials; FailedPrecondition where the kind is not
        offered (another host, no GPU, no backend); OSError where the handoff socket cannot
        be reached."""
        md = ((wire.MD_AUTHORIZATION, wire.bearer(token)),) if token else ()
        with _channel(address, tls) as channel:
            req = pb.OpenTransportRequest(kind=kind, host_id=config.host_id or hostid.host_id(),
                                          buffer_bytes=config.buffer_bytes, backend=config.dist_backend)
            resp = _unary(pb_grpc.StoreTransportStub(channel).Open, req, md, config, -1, address)
        params = {f.name: str(v) for f, v in resp.ListFields()}
        return cls.connect(address, kind, params, config, metadata=md, tls=tls)

    @classmethod
    def connect(cls, address: str, kind: str, params, config: ClientConfig = ClientConfig(), *,
                metadata: tuple = (), tls=None) -> "BulkPath":
        """Join a session opened for us (`params`: what `SessionTable.open` returned, as strings).
        metadata: the caller's credentials (sent with every call); tls: a store_service.tls.ClientTls."""
        channel = _channel(address, tls)
        try:
            description = wire.description_from_proto(
                _unary(pb_grpc.KnowledgeStoreStub(channel).Describe, pb.DescribeRequest(), metadata, config, -1, address),
                address)
            if kind == "torch_dist":
                host = params.get("rendezvous_host", "")
                if host in ("", "0.0.0.0", "::"):
                    host = address.rsplit(":", 1)[0].strip("[]")
                end = DistEnd(host, int(params["rendezvous_port"]), params["ticket"], config.dist_backend,
                              config.timeout_s)
            else:
                header, fds, lease = handoff.receive(params["socket"], params["ticket"])
                end = ShmEnd(fds[0], lease, config.device) if kind == "shm" else CudaEnd(header, lease)
        except BaseException:
            channel.close()
            raise
        return cls(address, channel, end, params["session"], int(params.get("max_bytes", 0)), description, config,
                   metadata)

    def close(self) -> None:
        try:
            _unary(self._stub.Close, pb.CloseTransportRequest(session=self._session), self._md, self.config,
                   self.shard_id, self.address)
        except errors.StoreError:
            pass   # the shard is gone: so is the session
        self._end.close()
        self._channel.close()

    def __repr__(self) -> str:
        return f"BulkPath({self.address!r}, kind={self.kind!r})"

    # -- calls ---------------------------------------------------------------------

    def _at(self, slot) -> pb.Placement:
        return pb.Placement(session=self._session, offset=slot.offset, capacity=slot.capacity, tag=slot.tag)

    def _result(self, fut):
        try:
            return fut.result()
        except grpc.RpcError as err:
            raise _domain(err, self.shard_id, self.address) from None

    def _lease(self, version: int) -> tuple[int, str]:
        """Pin `version` (0: the serving one) for a read of several pieces -> (version, lease);
        (version, "") where the shard grants none (it keeps none, or this caller holds its cap)."""
        req = pb.LeaseRequest(version=version, ttl_s=self.config.timeout_s, session=self._session)
        try:
            resp = self._store.LeaseVersion(req, timeout=self.config.timeout_s, metadata=self._md)
        except grpc.RpcError as err:
            domain = _domain(err, self.shard_id, self.address)
            if err.code() == grpc.StatusCode.UNIMPLEMENTED or isinstance(domain, errors.FailedPrecondition):
                self._leases = False   # a shard that keeps none
                return version, ""
            if isinstance(domain, errors.ResourceExhausted):
                return version, ""     # this caller holds its cap: read without one
            raise domain from None
        return resp.version, resp.lease

    def _unlease(self, lease: str) -> None:
        try:
            self._store.ReleaseLease(pb.ReleaseLeaseRequest(lease=lease), timeout=self.config.timeout_s,
                                     metadata=self._md)
        except grpc.RpcError:
            pass   # it lapses at its deadline, or went with the shard

    def _read(self, rows: int, row_bytes: int, version: int, make, out: torch.Tensor) -> int:
        """Read `out` in pieces: make(rows slice, version, first, lease) -> (rpc, request); every
        piece from one version at one step. -> the version read."""
        parts = slots.pieces(rows, row_bytes, self._slots.capacity)
        for attempt in range(self.config.retries + 1):
            stamps: list[tuple[int, int]] = []
            pinned, lease = self._lease(version) if self._leases and len(parts) > 1 else (version, "")

            def start(part, slot, v, alone):
                rpc, req = make(part, v, attempt == 0, lease)
                req.at.CopyFrom(self._at(slot))
                if alone:
                    return _Done(rpc, req, self.config.timeout_s, self._md)
                return rpc.future(req, timeout=self.config.timeout_s, metadata=self._md)

            def finish(part, slot, fut):
                resp = self._result(fut)
                stamps.append((resp.version, getattr(resp, "step", -1)))
                self._end.take(slot, out[part])

            depth = 1 if self._ordered else 0
            alone = len(parts) == 1 or self._ordered
            try:
                rest = parts
                with self._serial():
                    if not pinned and len(parts) > 1:   # no lease: the first piece's version is named in the rest
                        slots.run(self._slots, parts[:1], lambda p, s: start(p, s, 0, True), finish)
                        pinned, rest = stamps[0][0], parts[1:]
                    slots.run(self._slots, rest, lambda p, s: start(p, s, pinned, alone), finish, depth=depth)
            except errors.StaleVersion:
                if version or attempt == self.config.retries:
                    raise
                self.rereads += 1
                continue   # the version we pinned was released between pieces: read it all again
            finally:
                if lease:
                    self._unlease(lease)
            if len(set(stamps)) <= 1:
                return stamps[0][0] if stamps else version
            self.rereads += 1
        raise errors.FailedPrecondition(f"shard {self.shard_id} stepped or swapped during every one of "
                                        f"{self.config.retries + 1} reads of {rows} rows")

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None, weight_sum: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, version: int = 0) -> torch.Tensor:
        """ids [M] -> rows [M, d_v] in out_dtype (None: the table's), as Shard.fetch. They travel
        in the table's dtype, or in bfloat16 when that is asked for (rounded by the shard).
        Usage (hits, weight_sum) is sent with the first reading only, so a re-read counts once."""
        half = out_dtype == torch.bfloat16 and self.value_dtype != torch.bfloat16
        wire_dtype = "bfloat16" if half else ""
        out = torch.empty((ids.shape[0], self.d_v), dtype=torch.bfloat16 if half else self.value_dtype,
                          device=self._end.device)

        def make(part, v, first, lease):
            use = first and hits is not None
            req = wire.fetch_request_to_proto(ids[part], hits[part] if use else None,
                                              weight_sum[part] if use else None, wire_dtype, v)
            req.lease = lease
            return self._stub.Fetch, pb.PlacedFetchRequest(fetch=req)
        self._read(ids.shape[0], self.d_v * out.element_size(), version, make, out)
        return out if out_dtype is None else out.to(out_dtype)

    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, out_dtype: str = "float32", compact: bool = True,
                version: int = 0) -> torch.Tensor:
        """ids [T, k], weights [T, k] -> this shard's partial readout [T, d_v] (float32 sums,
        travelling as out_dtype), as Shard.readout."""
        out = torch.empty((ids.shape[0], self.d_v), dtype=wire.READOUT_WIRE_DTYPES[out_dtype], device=self._end.device)

        def make(part, v, first, lease):
            req = pb.ReadoutRequest(version=v, out_dtype=out_dtype, lease=lease)
            wire.readout_entries_to_proto(req, ids[part], weights[part], compact)
            return self._stub.Readout, pb.PlacedReadoutRequest(readout=req)
        self._read(ids.shape[0], self.d_v * out.element_size(), version, make, out)
        return out.float()

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str, out_dtype: str = "float32", compact: bool = True,
                         version: int = 0) -> torch.Tensor:
        """grad_out [T, d_v] (travelling as out_dtype through the buffer) -> grad of weights
        [T, k], as Shard.readout_backward; row gradients accumulated on the shard, once per
        request id. Pieces one at a time, in order, as gradients go; the shard sums each piece's
        rows first (as it does per call), so a backward larger than one slot applies rows
        repeated across pieces equal to float rounding, not bitwise (gRPC's chunking alike)."""
        grad_out = grad_out.detach().to(wire.READOUT_WIRE_DTYPES[out_dtype]).contiguous()
        parts = slots.pieces(ids.shape[0], grad_out.shape[1] * grad_out.element_size(), self._slots.capacity)
        outs: list = [None] * len(parts)
        sends = {}

        def start(i_part, slot):
            i, part = i_part
            sends[slot.tag] = self._end.put(slot, grad_out[part])
            rb = pb.ReadoutBackwardRequest(version=version,
                                           request_id=request_id if len(parts) == 1 else f"{request_id}/{i}")
            mask = wire.readout_entries_to_proto(rb, ids[part], weights[part], compact)
            rb.grad_out.dtype, rb.grad_out.shape[:] = out_dtype, grad_out[part].shape
            fut = _Done(self._stub.ReadoutBackward, pb.PlacedReadoutBackwardRequest(at=self._at(slot), backward=rb),
                        self.config.timeout_s, self._md)
            return fut, mask

        def finish(i_part, slot, fut_mask):
            fut, mask = fut_mask
            work = sends.pop(slot.tag, None)
            grad_w = wire.from_proto(self._result(fut).grad_weights, "grad_weights")
            if work is not None:
                work.wait()
            outs[i_part[0]] = grad_w if mask is None else wire.scatter_slots(mask.cpu(), grad_w, 0.0, "grad_weights")
        with self._serial():
            slots.run(self._slots, list(enumerate(parts)), start, finish, depth=1)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str,
                               version: int = 0) -> None:
        self._push("value", ids, grads, request_id, version)

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str,
                             version: int = 0) -> None:
        self._push("key", ids, grads, request_id, version)

    def _push(self, kind: str, ids: torch.Tensor, grads: torch.Tensor, request_id: str, version: int) -> None:
        """Row gradients in pieces, each under its own request id derived from request_id
        (a retried call is accumulated once, as over gRPC). One piece at a time, in order: the
        shard sums repeated rows in arrival order, so this keeps the sums bitwise those of one
        call with every row."""
        if grads.dim() != 2 or grads.shape[0] != ids.shape[0]:
            raise errors.InvalidArgument("grads", f"expected [{ids.shape[0]}, d], got {list(grads.shape)}")
        parts = slots.pieces(ids.shape[0], grads.shape[1] * grads.element_size(), self._slots.capacity)
        grads = grads.detach().contiguous()
        sends = {}

        def start(i_part, slot):
            i, part = i_part
            sends[slot.tag] = self._end.put(slot, grads[part])
            req = pb.PlacedGradsRequest(at=self._at(slot), kind=kind, version=version,
                                        request_id=request_id if len(parts) == 1 else f"{request_id}/{i}")
            wire.ids_to_proto(ids[part], req.ids)
            req.grads.dtype, req.grads.shape[:] = wire.dtype_name(grads.dtype), grads[part].shape
            return _Done(self._stub.PushGrads, req, self.config.timeout_s, self._md)

        def finish(i_part, slot, fut):
            work = sends.pop(slot.tag, None)
            self._result(fut)
            if work is not None:
                work.wait()
        with self._serial():
            slots.run(self._slots, list(enumerate(parts)), start, finish, depth=1)

    def _serial(self):
        """Held for a whole call where the medium pairs messages in order (NCCL), else nothing."""
        return self._one_at_a_time if self._ordered else contextlib.nullcontext()


def _domain(err: grpc.RpcError, shard_id: int, address: str) -> errors.StoreError:
    """The domain error of a failed call: the one mapping the gRPC path uses."""
    domain = error_from_rpc(err, shard_id, address)
    if isinstance(domain, errors.ShardUnavailable):
        return errors.ShardUnavailable(shard_id, address, f"{err.code().name}: {err.details()}")
    return domain


def _unary(rpc, req, md, config: ClientConfig, shard_id: int, address: str):
    try:
        return rpc(req, timeout=config.timeout_s, metadata=md)
    except grpc.RpcError as err:
        raise _domain(err, shard_id, address) from None


def _channel(address: str, tls) -> grpc.Channel:
    return tls.channel(address, _OPTIONS) if tls is not None else grpc.insecure_channel(address, options=_OPTIONS)


def open_path(address: str, token: str, config: ClientConfig = ClientConfig(), tls=None) -> BulkPath | None:
    """The first of config.kinds the shard grants, or None (the caller stays on gRPC)."""
    for kind in config.kinds:
        try:
            return BulkPath.open(address, token, kind, config, tls)
        except (errors.FailedPrecondition, errors.InvalidArgument, OSError):
            continue
    return None
