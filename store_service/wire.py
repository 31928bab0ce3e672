"""What travels over gRPC: the only place tensors meet bytes, and where messages become
domain objects and back (server and client both convert here), with the service names
and the metadata the two sides agree on.

A Tensor message is raw little-endian bytes, row-major, with dtype and shape
beside them (DESIGN.md section 5). Encoding makes one copy (tensor -> bytes);
decoding makes none beyond the bytes object protobuf hands us: the tensor is
a view of it (`torch.frombuffer`), which keeps it alive.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Mapping, Sequence

import torch

from protos import knowledge_store_pb2 as pb
from store_service.errors import InvalidArgument
from store_service.interface import (SearchResult, SegmentInfo, ShardDescription, ShardInfo, SideQuery, TagFilter,
                                     UsageStats)
from store_service.optimizer import OptimizerConfig, RowOptimizer

if sys.byteorder != "little":  # pragma: no cover - every platform we run on
    raise ImportError("store_service.wire assumes a little-endian host")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,  # raw 2-byte bfloat16
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

INT32_MAX = 2**31 - 1

# The dtypes the d_v-wide readout tensors (partial readouts, their gradients) may travel in.
READOUT_WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidArgument("dtype", f"{dtype} cannot travel; use one of {sorted(DTYPES)}") from None


def to_proto(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """tensor -> Tensor message (fills `out` in place when given, e.g. a request's sub-message)."""
    msg = pb.Tensor() if out is None else out
    name = dtype_name(t.dtype)
    t = t.detach()
    if t.device.type == "cuda":
        # Through page-locked memory (torch caches those buffers): a copy into a fresh
        # pageable buffer is slower per byte (benchmarks/STORE_NOTES.md).
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        t = host
    elif t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    msg.dtype = name
    msg.shape[:] = t.shape
    # A flat byte view works for every dtype, bfloat16 included (numpy has none).
    msg.data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return msg


def ids_to_proto(ids: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Row ids travel as int32 when every id fits (half the bytes), else int64.
    The dtype field says which; `from_proto(..., ids=True)` widens back to int64."""
    return to_proto(narrow_ids(ids), out)


def narrow_ids(ids: torch.Tensor) -> torch.Tensor:
    """int64 ids as int32 when every one fits (one pass and one device sync for the bounds)."""
    if ids.dtype == torch.int64 and ids.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
        if -1 <= lo and hi <= INT32_MAX:
            return ids.to(torch.int32)
    return ids


def from_proto(msg: pb.Tensor, field: str, *, dtypes: tuple[str, ...] | None = None,
               ndim: int | None = None, ids: bool = False, raw: tuple[bytes, int, int] | None = None) -> torch.Tensor:
    """Tensor message -> tensor, validated. Errors raise InvalidArgument naming `field`.

    dtypes: accepted dtype names (None: any known). ndim: required rank.
    ids: accept int32 or int64 and return int64.
    raw: (buffer, offset, nbytes): the data is there, not in msg.data (a message split by
    wire_chunks.split_tensor_data); the tensor is a view of the buffer.
    """
    if ids:
        dtypes = ("int64", "int32")
    if not msg.dtype:
        raise InvalidArgument(field, "missing (no dtype)")
    if msg.dtype not in DTYPES:
        raise InvalidArgument(field, f"unknown dtype {msg.dtype!r}; expected one of {sorted(DTYPES)}")
    if dtypes is not None and msg.dtype not in dtypes:
        raise InvalidArgument(field, f"dtype {msg.dtype} not accepted here; expected {' or '.join(dtypes)}")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise InvalidArgument(field, f"negative dimension in shape {list(shape)}")
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(field, f"expected {ndim} dimensions, got shape {list(shape)}")
    dtype = DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    data, offset, nbytes = raw if raw is not None else (msg.data, 0, None)  # msg.data: a fresh bytes object
    nbytes = len(data) if nbytes is None else nbytes
    expected = math.prod(shape) * itemsize
    if nbytes != expected:
        raise InvalidArgument(field, f"{nbytes} data bytes do not match shape {list(shape)} "
                                     f"of {msg.dtype} ({expected} bytes)")
    if expected == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        with warnings.catch_warnings():
            # frombuffer warns that `bytes` is read-only; the buffer is ours alone.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(data, dtype=dtype, count=expected // itemsize, offset=offset).reshape(shape)
    if ids and t.dtype != torch.int64:
        t = t.to(torch.int64)
    return t


# -- compacted (token, slot) grids ------------------------------------------------------

def _bit_weights(device: torch.device) -> torch.Tensor:
    return (2 ** torch.arange(8, device=device)).to(torch.uint8)


def slots_to_proto(mask: torch.Tensor, out: pb.SlotMask) -> pb.SlotMask:
    """bool [rows, cols] -> SlotMask (bits packed LSB first, row-major; packed on the
    mask's device so only the bits cross to the host)."""
    rows, cols = mask.shape
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    packed = (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)
    out.rows, out.cols = rows, cols
    out.bits = packed.cpu().numpy().tobytes()
    return out


def slots_from_proto(msg: pb.SlotMask, field: str = "slots", device: torch.device | str = "cpu") -> torch.Tensor:
    """SlotMask -> bool [rows, cols] on `device` (only the packed bits cross to it),
    validated (InvalidArgument naming `field`)."""
    rows, cols = int(msg.rows), int(msg.cols)
    if rows < 0 or cols < 0:
        raise InvalidArgument(field, f"negative grid {rows} x {cols}")
    n = rows * cols
    if len(msg.bits) != (n + 7) // 8:
        raise InvalidArgument(field, f"{len(msg.bits)} bytes of bits for a {rows} x {cols} grid "
                                     f"(expected {(n + 7) // 8})")
    if n == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        packed = torch.frombuffer(msg.bits, dtype=torch.uint8).to(device)
    bits = (packed[:, None] & _bit_weights(packed.device)).ne(0).reshape(-1)
    if bool(bits[n:].any()):
        raise InvalidArgument(field, "padding bits past the last slot are set")
    return bits[:n].reshape(rows, cols)


def scatter_slots(mask: torch.Tensor, entries: torch.Tensor, fill: float | int, field: str) -> torch.Tensor:
    """entries [E] (the slots set in mask, row-major) -> [rows, cols] on the mask's device,
    `fill` elsewhere."""
    count = int(mask.sum())
    if entries.shape != (count,):
        raise InvalidArgument(field, f"expected {count} entries (the slots set), got shape {list(entries.shape)}")
    out = torch.full(mask.shape, fill, dtype=entries.dtype, device=mask.device)
    out[mask] = entries.to(mask.device)
    return out


# -- gRPC names and metadata ----------------------------------------------------------

STORE_SERVICE = pb.DESCRIPTOR.services_by_name["KnowledgeStore"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["StoreAdmin"].full_name

# The StoreAdmin bearer token travels as `authorization: Bearer <token>`.
MD_AUTHORIZATION = "authorization"

# Trailing metadata that carries what a status code alone cannot.
MD_ERROR = "ks-error"                        # domain error class, e.g. "stale-version"
MD_FIELD = "ks-field"                        # the offending field of an INVALID_ARGUMENT
MD_REQUESTED_VERSION = "ks-requested-version"
MD_SERVING_VERSION = "ks-serving-version"
MD_STALE_REASON = "ks-stale-reason"           # StaleVersion's reason, where it has one


def bearer(token: str) -> str:
    """The `authorization` metadata value for an admin token."""
    return f"Bearer {token}"


# -- messages <-> domain objects ------------------------------------------------------
# `x_to_proto` fills a message (client requests, server responses); `x_from_proto`
# reads one back, validated (InvalidArgument naming the field).

_FLOATS = ("float32",)
VALUE_DTYPES = ("float32", "bfloat16")


def description_to_proto(d: ShardDescription) -> pb.DescribeResponse:
    i = d.info
    return pb.DescribeResponse(
        info=pb.ShardInfo(shard_id=i.shard_id, row_start=i.row_start, row_end=i.row_end, version=i.version,
                          step=i.step, address=i.address, tag_rows=i.tag_rows, partition_rows=i.partition_rows),
        d_k=d.d_k, d_v=d.d_v, value_dtype=d.value_dtype,
        segments=[pb.Segment(kind=s.kind, row_start=s.row_start, num_rows=s.num_rows, n_sub=s.n_sub)
                  for s in d.segments])


def description_from_proto(r: pb.DescribeResponse, address: str) -> ShardDescription:
    i = r.info
    info = ShardInfo(shard_id=int(i.shard_id), row_start=int(i.row_start), row_end=int(i.row_end),
                     version=int(i.version), step=int(i.step), address=address,
                     tag_rows=dict(sorted((str(k), int(v)) for k, v in i.tag_rows.items())),
                     partition_rows=dict(sorted((int(k), int(v)) for k, v in i.partition_rows.items())))
    segments = tuple(SegmentInfo(kind=s.kind, row_start=int(s.row_start), num_rows=int(s.num_rows),
                                 n_sub=int(s.n_sub)) for s in r.segments)
    return ShardDescription(info=info, d_k=int(r.d_k), d_v=int(r.d_v), value_dtype=r.value_dtype, segments=segments)


def search_request_to_proto(queries: torch.Tensor, k: int, tags: Sequence[str], where: TagFilter | None,
                            side: SideQuery | None, version: int, want_keys: bool = False) -> pb.SearchRequest:
    req = pb.SearchRequest(version=version, k=k, tags=list(tags), want_keys=want_keys)
    to_proto(queries, req.queries)
    if where is not None:
        req.where.name = where.name
        if where.values:
            to_proto(torch.tensor(where.values, dtype=torch.int64), req.where.values)
    if side is not None:
        req.side.partition, req.side.k = side.partition, side.k
    return req


def search_request_from_proto(req: pb.SearchRequest, queries: bool = True) -> tuple[torch.Tensor | None, dict]:
    """-> (queries, keyword arguments of ShardHandle.search besides k and version).
    queries=False: the queries are read elsewhere (wire_search), None here."""
    queries = from_proto(req.queries, "queries", dtypes=_FLOATS, ndim=2) if queries else None
    where = side = None
    if req.HasField("where"):
        values = ()
        if req.where.HasField("values"):
            values = tuple(from_proto(req.where.values, "where.values", dtypes=("int64",), ndim=1).tolist())
        where = TagFilter(req.where.name, values)
    if req.HasField("side"):
        side = SideQuery(int(req.side.partition), int(req.side.k))
    return queries, dict(tags=tuple(req.tags), where=where, side=side, want_keys=bool(req.want_keys))


def tags_to_proto(tags: dict[str, torch.Tensor], out) -> None:
    # A tag unset on every row found is left out (the reader fills it in): most searches
    # of a table whose rows carry few tags find none.
    for name, t in tags.items():
        if bool((t != -1).any()):
            ids_to_proto(t, out[name])


def tags_from_proto(msg, names: Sequence[str], like: torch.Tensor, field: str) -> dict[str, torch.Tensor]:
    return {name: from_proto(msg[name], f"{field}[{name}]", ids=True) if name in msg else torch.full_like(like, -1)
            for name in names}


def search_result_to_proto(res: SearchResult) -> pb.SearchResponse:
    resp = pb.SearchResponse()
    ids_to_proto(res.ids, resp.ids)
    to_proto(res.scores, resp.scores)
    if res.keys is not None:
        to_proto(res.keys, resp.keys)
    tags_to_proto(res.tags, resp.tags)
    if res.side is not None:
        ids_to_proto(res.side.ids, resp.side.ids)
        to_proto(res.side.scores, resp.side.scores)
        tags_to_proto(res.side.tags, resp.side.tags)
    return resp


def search_result_from_proto(r: pb.SearchResponse, tags: Sequence[str], side: bool) -> SearchResult:
    ids = from_proto(r.ids, "ids", ids=True)
    keys = from_proto(r.keys, "keys", dtypes=_FLOATS, ndim=3) if r.HasField("keys") else None
    res = SearchResult(ids=ids, scores=from_proto(r.scores, "scores"), keys=keys,
                       tags=tags_from_proto(r.tags, tags, ids, "tags"))
    if side:
        side_ids = from_proto(r.side.ids, "side.ids", ids=True)
        res.side = SearchResult(ids=side_ids, scores=from_proto(r.side.scores, "side.scores"), keys=None,
                                tags=tags_from_proto(r.side.tags, tags, side_ids, "side.tags"))
    return res


def add_rows_to_proto(req: pb.AddRowsRequest, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None,
                      tags: Mapping[str, torch.Tensor] | None, partition: torch.Tensor | int) -> pb.AddRowsRequest:
    to_proto(values, req.values)
    to_proto(keys, req.keys)
    if bias is not None:
        to_proto(bias, req.bias)
    for name, t in (tags or {}).items():
        to_proto(t, req.tags[name])
    if isinstance(partition, torch.Tensor):
        to_proto(partition, req.partition)
    elif partition != 0:
        to_proto(torch.full((values.shape[0],), partition, dtype=torch.int64), req.partition)
    return req


def add_rows_from_proto(req: pb.AddRowsRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """-> (values, keys, bias, keyword arguments tags and partition); copies, since the shard
    keeps these rows and must not alias the request's buffer."""
    values = from_proto(req.values, "values", dtypes=VALUE_DTYPES, ndim=2).clone()
    keys = from_proto(req.keys, "keys", dtypes=_FLOATS, ndim=2).clone()
    bias = from_proto(req.bias, "bias", dtypes=_FLOATS, ndim=1).clone() if req.HasField("bias") else None
    tags = {name: from_proto(t, f"tags[{name}]", dtypes=("int64",), ndim=1).clone() for name, t in req.tags.items()}
    partition = from_proto(req.partition, "partition", dtypes=("int64",), ndim=1).clone() \
        if req.HasField("partition") else 0
    return values, keys, bias, dict(tags=tags, partition=partition)


def optimizer_to_proto(opt: OptimizerConfig, out: pb.OptimizerSettings) -> pb.OptimizerSettings:
    out.kind, out.lr, out.eps = opt.kind, opt.lr, opt.eps
    out.beta1, out.beta2 = opt.betas
    if opt.key_lr is not None:
        out.key_lr = opt.key_lr
    return out


def optimizer_from_proto(msg: pb.OptimizerSettings) -> OptimizerConfig:
    """Validated by OptimizerConfig itself (InvalidArgument naming optimizer.<field>)."""
    return OptimizerConfig(kind=msg.kind, lr=msg.lr, key_lr=msg.key_lr if msg.HasField("key_lr") else None,
                           betas=(msg.beta1, msg.beta2), eps=msg.eps)


def row_optimizer_to_proto(old: RowOptimizer) -> pb.SetOptimizerResponse:
    resp = pb.SetOptimizerResponse(bias_step=old.bias_step)
    optimizer_to_proto(old.optimizer, resp.optimizer)
    return resp


def row_optimizer_from_proto(r: pb.SetOptimizerResponse) -> RowOptimizer:
    return RowOptimizer(optimizer_from_proto(r.optimizer), float(r.bias_step))


def fetch_request_to_proto(ids: torch.Tensor, hits: torch.Tensor | None, weight_sum: torch.Tensor | None,
                           out_dtype: str, version: int) -> pb.FetchRequest:
    req = pb.FetchRequest(version=version, out_dtype=out_dtype)
    ids_to_proto(ids, req.ids)
    if hits is not None:
        ids_to_proto(hits, req.hits)   # counts: int32 when they fit, like ids
        to_proto(weight_sum, req.weight_sum)
    return req


def fetch_request_from_proto(req: pb.FetchRequest) -> tuple[torch.Tensor, torch.dtype | None, dict]:
    """-> (ids, the dtype values travel back in (None: the table's), usage keyword arguments)."""
    ids = from_proto(req.ids, "ids", ids=True, ndim=1)
    out_dtype = readout_wire_dtype(req.out_dtype, "out_dtype") if req.out_dtype else None
    usage = {}
    if req.HasField("hits") or req.HasField("weight_sum"):
        usage = dict(hits=from_proto(req.hits, "hits", ids=True, ndim=1),
                     weight_sum=from_proto(req.weight_sum, "weight_sum", dtypes=("float64", "float32"),
                                           ndim=1).double())
    return ids, out_dtype, usage


def usage_to_proto(u: UsageStats) -> pb.UsageResponse:
    resp = pb.UsageResponse()
    to_proto(u.hits, resp.hits)
    to_proto(u.weight_sum, resp.weight_sum)
    to_proto(u.frozen, resp.frozen)
    to_proto(u.ablated, resp.ablated)
    return resp


def usage_from_proto(r: pb.UsageResponse) -> UsageStats:
    return UsageStats(hits=from_proto(r.hits, "hits"), weight_sum=from_proto(r.weight_sum, "weight_sum"),
                      frozen=from_proto(r.frozen, "frozen"), ablated=from_proto(r.ablated, "ablated"))


def readout_wire_dtype(name: str, field: str) -> torch.dtype:
    """A readout wire dtype name ("" = float32) -> torch dtype."""
    try:
        return READOUT_WIRE_DTYPES[name or "float32"]
    except KeyError:
        raise InvalidArgument(field, f"{name!r} is not a readout wire dtype; use one of "
                                     f"{' or '.join(READOUT_WIRE_DTYPES)}") from None


def readout_entries_to_proto(req, ids: torch.Tensor, weights: torch.Tensor, compact: bool) -> torch.Tensor | None:
    """Fill a readout request's ids [T, k] and weights [T, k]; compact: only the entries
    that are not padding, with the slot mask of where they go (returned; else None)."""
    if not compact:
        ids_to_proto(ids, req.ids)
        to_proto(weights, req.weights)
        return None
    mask = ids != -1      # compacted where the tensors live, so only the entries cross to the host
    slots_to_proto(mask, req.slots)
    ids_to_proto(ids[mask], req.ids)
    to_proto(weights[mask], req.weights)
    return mask


def readout_entries_from_proto(req, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(slot mask or None, ids [T, k], weights [T, k]) of a (possibly compacted) readout
    request; a compacted one is expanded on `device`, where the shard's rows are."""
    if not req.HasField("slots"):
        return (None, from_proto(req.ids, "ids", ids=True, ndim=2),
                from_proto(req.weights, "weights", dtypes=_FLOATS, ndim=2))
    mask = slots_from_proto(req.slots, "slots", device=device)
    ids = from_proto(req.ids, "ids", ids=True, ndim=1)
    weights = from_proto(req.weights, "weights", dtypes=_FLOATS, ndim=1)
    return mask, scatter_slots(mask, ids, -1, "ids"), scatter_slots(mask, weights, 0.0, "weights")


def readout_tokens(req) -> int:
    """Tokens in a readout request (for metrics)."""
    if req.HasField("slots"):
        return int(req.slots.rows)
    return req.ids.shape[0] if req.ids.shape else 0


def endpoint_to_proto(e) -> pb.Endpoint:
    """datapath.Endpoint -> Endpoint message."""
    return pb.Endpoint(host_id=e.host_id, pid=e.pid, device=e.device)


def endpoint_from_proto(msg: pb.Endpoint, field: str):
    """Endpoint message -> datapath.Endpoint, bounded (InvalidArgument naming `field`)."""
    from store_service.datapath import Endpoint
    for name in ("host_id", "device"):
        if len(getattr(msg, name)) > 256:
            raise InvalidArgument(f"{field}.{name}", "longer than 256 characters")
    return Endpoint(host_id=msg.host_id, pid=int(msg.pid), device=msg.device)
