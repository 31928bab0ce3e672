"""Bounds on a request's work, checked from the message itself before anything is
decoded or allocated (store_service/limits.py has the bounds and why).

Each function raises `errors.ResourceExhausted` naming the limit a request is over.
`dims` are the shard's (d_k, d_v, value itemsize), for the size of the answer.
"""
from __future__ import annotations

from protos import knowledge_store_pb2 as pb

from .limits import Limits, at_most


def _rows(t: pb.Tensor) -> int:
    return int(t.shape[0]) if len(t.shape) else 0


def search(req: pb.SearchRequest, lim: Limits, d_k: int) -> None:
    at_most("max_k", req.k, lim.max_k, "k")
    side_k = req.side.k if req.HasField("side") else 0
    at_most("max_k", side_k, lim.max_k, "side.k")
    b = _rows(req.queries)
    at_most("max_queries", b, lim.max_queries, "queries")
    tags = len(req.tags)
    reply = b * (max(req.k, 0) * (8 + 4 + 4 * d_k + 8 * tags) + max(side_k, 0) * (8 + 4 + 8 * tags))
    at_most("max_reply_bytes", reply, lim.max_reply_bytes, "answer bytes")


def fetch(req: pb.FetchRequest, lim: Limits, d_v: int, itemsize: int) -> None:
    m = _rows(req.ids)
    at_most("max_fetch_rows", m, lim.max_fetch_rows, "ids")
    size = 2 if req.out_dtype == "bfloat16" else itemsize
    at_most("max_reply_bytes", m * d_v * size, lim.max_reply_bytes, "answer bytes")


def rows(t: pb.Tensor, lim: Limits, field: str) -> None:
    """Ids of a gradient call."""
    at_most("max_fetch_rows", _rows(t), lim.max_fetch_rows, field)


def readout(req, lim: Limits, d_v: int, backward: bool) -> None:
    """A Readout or ReadoutBackward request: its token rows, slot grid and answer."""
    if req.HasField("slots"):
        t, cols = int(req.slots.rows), int(req.slots.cols)
        at_most("max_readout_rows", t, lim.max_readout_rows, "slots.rows")
        at_most("max_mask_slots", t * cols, lim.max_mask_slots, "slots.rows x slots.cols")
        entries = _rows(req.ids)
    else:
        t = _rows(req.ids)
        at_most("max_readout_rows", t, lim.max_readout_rows, "ids rows")
        cols = int(req.ids.shape[1]) if len(req.ids.shape) > 1 else 0
        at_most("max_mask_slots", t * cols, lim.max_mask_slots, "ids rows x cols")
        entries = t * cols
    reply = entries * 4 if backward else t * d_v * 4
    at_most("max_reply_bytes", reply, lim.max_reply_bytes, "answer bytes")
