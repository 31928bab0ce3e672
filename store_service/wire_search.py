"""Search over gRPC as raw bytes (issue 21): queries in, ids and scores out, each payload
copied once a side and never touched element by element in Python.

A search of 4,096 queries at d_k 128 sends 2 MB of queries and gets 1 MB of ids and scores
back. Through protobuf each payload was copied four times (tensor -> bytes -> message ->
serialized message, and on the other side message -> bytes field -> tensor). Here:
- the caller writes the SearchRequest's bytes itself (`encode_search_request`: the small
  fields by protobuf, the queries' bytes appended as the Tensor's `data`, one copy);
- the server, registered with a pass-through deserializer, splits the message into its small
  header (parsed by protobuf, exactly as the whole message would be) and the place of the
  queries' bytes in the received buffer, which the tensor views (`decode_search_request`);
- the answer goes back the same way (`encode_search_result` / `decode_search_result`).
Any protobuf reader or writer sees ordinary SearchRequest / SearchResponse messages: a
client sending a protobuf-encoded request gets the same answer (tests/store/test_wire_search.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from protos import knowledge_store_pb2 as pb
from store_service import wire, wire_chunks
from store_service.errors import InvalidArgument
from store_service.interface import SearchResult, SideQuery, TagFilter

_REQ_QUERIES = 2                         # SearchRequest.queries
_RES_IDS, _RES_SCORES, _RES_KEYS = 1, 2, 3  # SearchResponse
_FLOATS = ("float32",)


def encode_search_request(queries: torch.Tensor, k: int, tags: Sequence[str], where: TagFilter | None,
                          side: SideQuery | None, version: int, want_keys: bool = False) -> bytes:
    header = pb.SearchRequest(version=version, k=k, tags=list(tags), want_keys=want_keys)
    if where is not None:
        header.where.name = where.name
        if where.values:
            wire.to_proto(torch.tensor(where.values, dtype=torch.int64), header.where.values)
    if side is not None:
        header.side.partition, header.side.k = side.partition, side.k
    return wire_chunks.encode_with_tensors(header, [(_REQ_QUERIES, queries)])


def _parse(cls, header: bytes, what: str):
    try:
        return cls.FromString(header)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the sender's malformed message
        raise InvalidArgument(what, f"malformed message ({type(exc).__name__})") from None


def split_search_request(raw: bytes) -> tuple[pb.SearchRequest, tuple[bytes, int, int] | None]:
    """The bytes of a SearchRequest -> (the message without the queries' data, where that
    data is in raw (None: absent)). The header carries the queries' dtype and shape, so
    guard.search bounds the request before anything else is read."""
    header, data = wire_chunks.split_tensor_data(raw, frozenset({_REQ_QUERIES}), "request")
    req = _parse(pb.SearchRequest, header, "request")
    at = data.get(_REQ_QUERIES)
    return req, None if at is None else (raw, at[0], at[1])


def search_request_from_split(req: pb.SearchRequest, at: tuple[bytes, int, int] | None) -> tuple[torch.Tensor, dict]:
    """-> (queries, a view of the received bytes, and ShardHandle.search's other keyword
    arguments), validated as wire.search_request_from_proto validates a parsed message."""
    queries = wire.from_proto(req.queries, "queries", dtypes=_FLOATS, ndim=2, raw=at or (b"", 0, 0))
    _, options = wire.search_request_from_proto(req, queries=False)
    return queries, options


def aligned_for(queries: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The view of the received bytes sits at whatever offset the message put it. CPU math
    libraries may pick other kernels (another summation order) for data that is not 64-byte
    aligned, so a shard computing on the CPU gets an aligned copy, as torch allocates it:
    the answer is then bitwise the in-process one. A GPU shard copies to its device anyway."""
    if device.type == "cpu" and queries.numel() and queries.data_ptr() % 64:
        return queries.clone()
    return queries


def encode_search_result(res: SearchResult) -> bytes:
    """A SearchResult -> the bytes of a SearchResponse: tags and the side query's answer (small,
    and usually absent) by protobuf, ids (int32 when they fit), scores and keys raw."""
    header = pb.SearchResponse()
    wire.tags_to_proto(res.tags, header.tags)
    if res.side is not None:
        wire.ids_to_proto(res.side.ids, header.side.ids)
        wire.to_proto(res.side.scores, header.side.scores)
        wire.tags_to_proto(res.side.tags, header.side.tags)
    tensors = [(_RES_IDS, wire.narrow_ids(res.ids)), (_RES_SCORES, res.scores)]
    if res.keys is not None:
        tensors.append((_RES_KEYS, res.keys))
    return wire_chunks.encode_with_tensors(header, tensors)


def decode_search_result(raw: bytes, tags: Sequence[str], side: bool) -> SearchResult:
    """The bytes of a SearchResponse -> SearchResult; scores and keys are views of raw."""
    header, data = wire_chunks.split_tensor_data(raw, frozenset({_RES_IDS, _RES_SCORES, _RES_KEYS}), "answer")
    r = _parse(pb.SearchResponse, header, "answer")

    def at(field):
        return (raw, *data[field]) if field in data else (b"", 0, 0)
    ids = wire.from_proto(r.ids, "ids", ids=True, raw=at(_RES_IDS))
    keys = (wire.from_proto(r.keys, "keys", dtypes=_FLOATS, ndim=3, raw=at(_RES_KEYS))
            if r.HasField("keys") else None)
    res = SearchResult(ids=ids, scores=wire.from_proto(r.scores, "scores", raw=at(_RES_SCORES)), keys=keys,
                       tags=wire.tags_from_proto(r.tags, tags, ids, "tags"))
    if side:
        side_ids = wire.from_proto(r.side.ids, "side.ids", ids=True)
        res.side = SearchResult(ids=side_ids, scores=wire.from_proto(r.side.scores, "side.scores"), keys=None,
                                tags=wire.tags_from_proto(r.side.tags, tags, side_ids, "side.tags"))
    return res
