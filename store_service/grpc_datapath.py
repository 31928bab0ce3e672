"""`GrpcDataPath`: the data path every (client, shard server) pair has, over gRPC (TCP, any host).

What makes it fast (benchmarks/WIRE_NOTES.md has the figures):
- A fetch of many rows is split into parts sent on different channels of the shard's pool
  (each its own TCP connection), all in flight at once; each part's reply is a FetchStream
  of pieces of about `WireConfig.chunk_bytes`, so the server's encoding, the transport and
  the client's decoding of different pieces overlap.
- A piece is raw bytes copied once on each side (store_service/wire_chunks.py) and copied
  straight into its place in the result: no per-element Python work, no concatenation.
- Readouts and row gradients are split likewise (`readout_chunk_rows`, `grad_chunk_rows`).
- A read in several parts pins its version with a lease (store_service/leases.py), so every
  part is answered from one version even when a swap lands between them.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from protos import knowledge_store_pb2 as pb
from store_service import errors, wire, wire_chunks, wire_search
from store_service.interface import SearchResult
from store_service.wire import STORE_SERVICE

FETCH_STREAM = f"/{STORE_SERVICE}/FetchStream"
VALUE_GRADS = f"/{STORE_SERVICE}/AccumulateValueGrads"
SEARCH = f"/{STORE_SERVICE}/Search"
_GRADS_FIELD = pb.AccumulateValueGradsRequest.DESCRIPTOR.fields_by_name["grads"].number


@dataclass(frozen=True)
class WireConfig:
    """channels: gRPC channels (TCP connections) per shard. stream_min_rows: fetches of at
    least this many rows go through FetchStream (smaller: one unary Fetch). split_min_rows:
    a streamed fetch is split over the channels in parts of at least this many rows.
    chunk_rows: rows per streamed piece (0: the server's choice, about 4 MiB).
    grad_chunk_rows: row gradients of more rows than this are sent as several calls in flight."""
    channels: int = 4
    stream_min_rows: int = 256
    split_min_rows: int = 8192
    chunk_rows: int = 0
    grad_chunk_rows: int = 32768

    def __post_init__(self):
        for name in ("channels", "stream_min_rows", "split_min_rows", "grad_chunk_rows"):
            if getattr(self, name) < 1:
                raise errors.InvalidArgument(f"wire.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.chunk_rows < 0:
            raise errors.InvalidArgument("wire.chunk_rows", f"must be >= 0, got {self.chunk_rows}")


def split(rows: int, parts: int) -> list[slice]:
    """[0, rows) as `parts` contiguous slices of near-equal length (the first ones longer)."""
    parts = max(1, min(parts, rows))
    base, extra = divmod(rows, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        out.append(slice(start, end))
        start = end
    return out


class _Assembler:
    """The result of a fetch, filled piece by piece from several streams at once."""

    def __init__(self, rows: int, pin: bool = False):
        self.rows = rows
        self.pin = pin    # page-locked when the caller wants the rows on a GPU: a faster copy there
        self.out: torch.Tensor | None = None
        self._lock = threading.Lock()

    def put(self, start: int, values: torch.Tensor) -> None:
        with self._lock:
            if self.out is None:
                self.out = torch.empty((self.rows, *values.shape[1:]), dtype=values.dtype, pin_memory=self.pin)
        out = self.out
        if values.dim() != 2 or values.dtype != out.dtype or values.shape[1:] != out.shape[1:] \
                or start < 0 or start + values.shape[0] > self.rows:
            raise errors.InvalidArgument("values", f"piece of shape {list(values.shape)} {values.dtype} at row "
                                                   f"{start} does not fit a reply of {list(out.shape)} {out.dtype}")
        out[start:start + values.shape[0]].copy_(values)  # the piece's one copy (torch releases the GIL)


class GrpcDataPath:
    """The gRPC `DataPath` of one RemoteShard: uses its channels, retries and error mapping."""
    kind = "grpc"

    def __init__(self, shard, config: WireConfig):
        self._shard = shard
        self.config = config
        self.bind_channels()
        self._pool = ThreadPoolExecutor(max_workers=max(config.channels, 1), thread_name_prefix="kstore-wire")
        self._next = 0
        self._lock = threading.Lock()
        self._pin = str(getattr(shard, "device", "cpu")).startswith("cuda") and torch.cuda.is_available()
        self.leases = True     # off once the shard says it keeps none

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def bind_channels(self) -> None:
        """Raw callables over the shard's current channel pool (again after a reconnect)."""
        self._streams = [ch.unary_stream(FETCH_STREAM, request_serializer=pb.FetchRequest.SerializeToString,
                                         response_deserializer=None)  # raw bytes: wire_chunks decodes
                         for ch in self._shard.channels]
        # Row gradients as bytes encoded here (wire_chunks.encode_with_tensor): one copy.
        self._grads = [ch.unary_unary(VALUE_GRADS, request_serializer=None,
                                      response_deserializer=pb.AccumulateValueGradsResponse.FromString)
                       for ch in self._shard.channels]
        # Search as bytes both ways (wire_search): queries and answers copied once a side.
        self._searches = [ch.unary_unary(SEARCH, request_serializer=None, response_deserializer=None)
                          for ch in self._shard.channels]

    def _stubs(self, n: int) -> list:
        """n stubs over the channel pool, round robin across calls."""
        with self._lock:
            start, self._next = self._next, self._next + n
        return [self._shard.store_stubs[(start + i) % len(self._shard.store_stubs)] for i in range(n)]

    def _in_flight(self, jobs: list) -> list:
        """Run callables at once on the pool (the first in this thread); results in order."""
        if len(jobs) == 1:
            return [jobs[0]()]
        futures = [self._pool.submit(job) for job in jobs[1:]]
        first = jobs[0]()
        return [first] + [f.result() for f in futures]

    # -- search -------------------------------------------------------------
    def search(self, queries, k, *, tags=(), where=None, side=None, want_keys=False, version=0) -> SearchResult:
        """One Search call, raw bytes both ways, on the next channel of the pool."""
        raw = wire_search.encode_search_request(queries, k, tags, where, side, version, want_keys)
        with self._lock:
            i, self._next = self._next, self._next + 1
        # Looked up at each attempt: a retry after UNAVAILABLE reopens the pool and rebinds.
        answer = self._shard.call(lambda req, **kw: self._searches[i % len(self._searches)](req, **kw), raw)
        try:
            return wire_search.decode_search_result(answer, tags, side is not None)
        except errors.InvalidArgument as exc:   # the server's bytes, not the caller's input
            raise errors.ShardUnavailable(self._shard.shard_id, self._shard.address, f"malformed answer: {exc}") from None

    # -- version leases -------------------------------------------------------
    def _lease(self, version: int, parts: int) -> tuple[int, str]:
        """A read of several parts: (version pinned, lease); (version, "") for one part, or where
        the shard grants none (it keeps none, or this connection holds its cap of leases)."""
        if parts < 2 or not self.leases:
            return version, ""
        try:
            resp = self._shard.call(self._stubs(1)[0].LeaseVersion,
                                    pb.LeaseRequest(version=version, ttl_s=self._shard.timeout_s))
        except (errors.FailedPrecondition, errors.ResourceExhausted, errors.ShardUnavailable) as exc:
            if isinstance(exc, errors.ShardUnavailable) and "UNIMPLEMENTED" not in str(exc):
                raise
            self.leases = isinstance(exc, errors.ResourceExhausted)
            return version, ""
        return resp.version, resp.lease

    def _unlease(self, lease: str) -> None:
        if lease:
            try:
                self._shard.call(self._stubs(1)[0].ReleaseLease, pb.ReleaseLeaseRequest(lease=lease))
            except errors.StoreError:
                pass   # it lapses at its deadline

    # -- fetch --------------------------------------------------------------
    def fetch(self, ids, *, hits=None, weight_sum=None, out_dtype=None, version=0) -> torch.Tensor:
        dtype_name = "" if out_dtype is None else wire.dtype_name(out_dtype)
        rows = ids.shape[0]
        if rows < self.config.stream_min_rows:
            stub = self._stubs(1)[0]
            req = wire.fetch_request_to_proto(ids, hits, weight_sum, dtype_name, version)
            return wire.from_proto(self._shard.call(stub.Fetch, req).values, "values")
        parts = split(rows, min(self.config.channels, max(1, rows // self.config.split_min_rows)))
        with self._lock:
            first, self._next = self._next, self._next + len(parts)
        done = _Assembler(rows, pin=self._pin)
        version, lease = self._lease(version, len(parts))

        def job(i: int, part: slice):
            req = wire.fetch_request_to_proto(ids[part], None if hits is None else hits[part],
                                              None if weight_sum is None else weight_sum[part], dtype_name, version)
            req.chunk_rows, req.lease = self.config.chunk_rows, lease
            return lambda: self._stream_part(first + i, req, part, done)
        try:
            self._in_flight([job(i, p) for i, p in enumerate(parts)])
        finally:
            self._unlease(lease)
        return done.out

    def _stream_part(self, channel: int, req: pb.FetchRequest, part: slice, done: _Assembler) -> None:
        """One part's FetchStream on the pool's `channel`-th channel, retried as a whole on
        UNAVAILABLE before any piece arrived, on a reopened pool (as RemoteShard's unary calls)."""
        shard = self._shard
        start = time.monotonic()
        deadline = start + shard.timeout_s
        attempt = 0
        while True:
            got = 0
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.ShardUnavailable(shard.shard_id, shard.address, "deadline exceeded before the call")
                stream = self._streams[channel % len(self._streams)]
                for raw in stream(req, timeout=remaining, metadata=shard.data_metadata):
                    start, values = wire_chunks.decode_chunk(raw)
                    done.put(part.start + start, values)
                    got += values.shape[0]
                if got != part.stop - part.start:
                    raise errors.ShardUnavailable(shard.shard_id, shard.address,
                                                  f"FetchStream ended after {got} of {part.stop - part.start} rows")
                return
            except grpc.RpcError as err:
                pause = shard.retry_pause(attempt, start, deadline) \
                    if err.code() == grpc.StatusCode.UNAVAILABLE and got == 0 else None
                if pause is not None:
                    attempt += 1
                    time.sleep(pause)
                    shard.reopen_channels()   # a restarted server: not the old channel's backoff
                    continue
                raise shard.domain_error(err, attempt) from None

    # -- readout and row gradients --------------------------------------------
    def readout(self, ids, weights, *, out_dtype=torch.float32, version=0) -> torch.Tensor:
        shard = self._shard
        requests = []
        chunks = shard.row_chunks(ids.shape[0])
        if len(chunks) == 1:   # no chunking asked: a large readout still goes over the channel pool
            chunks = split(ids.shape[0], min(self.config.channels, max(1, ids.shape[0] // self.config.split_min_rows)))
        version, lease = self._lease(version, len(chunks))
        for rows in chunks:
            req = pb.ReadoutRequest(version=version, out_dtype=wire.dtype_name(out_dtype), lease=lease)
            wire.readout_entries_to_proto(req, ids[rows], weights[rows], shard.compact_readout)
            requests.append(req)
        stubs = self._stubs(len(requests))
        try:
            outs = self._in_flight([lambda s=s, r=r: shard.call(s.Readout, r) for s, r in zip(stubs, requests)])
        finally:
            self._unlease(lease)
        outs = [wire.from_proto(r.out, "out") for r in outs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def readout_backward(self, ids, weights, grad_out, *, request_id: str, version=0) -> torch.Tensor:
        """grad_out [T, d_v] (in the wire dtype) -> grad of the weights [T, k]; the row
        gradients are accumulated on the shard (once per request id), applied at its end_step.
        In `readout_chunk_rows` pieces in flight, each with an id derived from the caller's."""
        shard = self._shard
        chunks = shard.row_chunks(ids.shape[0])
        requests, masks = [], []
        for i, rows in enumerate(chunks):
            req = pb.ReadoutBackwardRequest(version=version,
                                            request_id=request_id if len(chunks) == 1 else f"{request_id}/{i}")
            masks.append(wire.readout_entries_to_proto(req, ids[rows], weights[rows], shard.compact_readout))
            wire.to_proto(grad_out[rows], req.grad_out)
            requests.append(req)
        stubs = self._stubs(len(requests))
        parts = []
        for mask, resp in zip(masks, self._in_flight([lambda s=s, r=r: shard.call(s.ReadoutBackward, r)
                                                      for s, r in zip(stubs, requests)])):
            grad_w = wire.from_proto(resp.grad_weights, "grad_weights")
            parts.append(grad_w if mask is None else wire.scatter_slots(mask.cpu(), grad_w, 0.0, "grad_weights"))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def accumulate_value_grads(self, ids, grads, *, request_id: str, version=0) -> None:
        shard = self._shard
        parts = split(ids.shape[0], -(-ids.shape[0] // self.config.grad_chunk_rows))
        with self._lock:
            first, self._next = self._next, self._next + len(parts)

        def job(i: int, part: slice):
            # Each piece has its own request id, derived from the call's, so a retried piece
            # is applied once and the pieces are not taken for retries of each other.
            rid = request_id if len(parts) == 1 else f"{request_id}/{i}"
            header = pb.AccumulateValueGradsRequest(version=version, request_id=rid)
            wire.ids_to_proto(ids[part], header.ids)
            raw = wire_chunks.encode_with_tensor(header, _GRADS_FIELD, grads[part])
            # Looked up at each attempt, as search's: a retry after UNAVAILABLE reopens the pool
            # and rebinds, and the pool that saw the server die is closed soon after.
            return lambda: shard.call(lambda req, **kw: self._grads[(first + i) % len(self._grads)](req, **kw), raw)
        self._in_flight([job(i, p) for i, p in enumerate(parts)])
