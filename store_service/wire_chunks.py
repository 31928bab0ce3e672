"""Bulk replies as bytes: a FetchChunk message encoded and decoded without protobuf's copies.

A row payload of hundreds of MB is copied several times on its way through protobuf
(tensor -> bytes -> message -> serialized message, and back). Here the server writes a
FetchChunk's bytes itself: the small header (row_start, the Tensor's dtype and shape)
through protobuf, then the tensor's raw bytes as a second occurrence of field `values`
holding only `data`; protobuf merges repeated occurrences of a message field, so this is an
ordinary FetchChunk to any reader. Encoding copies the payload once (into the reply), and
decoding not at all: the tensor is a view of the received bytes (`torch.frombuffer`).
"""
from __future__ import annotations

import math
import warnings

import torch

from protos import knowledge_store_pb2 as pb
from store_service import wire
from store_service.errors import InvalidArgument

_LEN = 2      # wire type of length-delimited fields
_VARINT = 0
_F_ROW_START, _F_VALUES = 1, 2                   # FetchChunk
_F_DTYPE, _F_SHAPE, _F_DATA = 1, 2, 3            # Tensor


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    shift = result = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise InvalidArgument("chunk", "malformed varint")


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cuda":   # through page-locked memory, as wire.to_proto does
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.contiguous() if t.device.type == "cpu" else t.cpu().contiguous()


def encode_with_tensor(header, field: int, t: torch.Tensor) -> bytes:
    """The bytes of message `header` with its Tensor field number `field` set to `t` (the
    field left unset in `header`): protobuf encodes the small parts, the payload is copied
    once, straight into the message."""
    t = _host(t)
    meta = pb.Tensor(dtype=wire.dtype_name(t.dtype), shape=t.shape).SerializeToString()
    data = t.reshape(-1).view(torch.uint8).numpy()
    inner = meta + _varint(_F_DATA << 3 | _LEN) + _varint(data.nbytes)
    outer = _varint(field << 3 | _LEN) + _varint(len(inner) + data.nbytes)
    return b"".join((header.SerializeToString(), outer, inner, data))  # the payload's one copy


def encode_chunk(row_start: int, t: torch.Tensor) -> bytes:
    """A tensor (rows row_start.. of a fetch) -> the bytes of a FetchChunk."""
    return encode_with_tensor(pb.FetchChunk(row_start=row_start), _F_VALUES, t)


def _parse_tensor(buf: memoryview, pos: int, end: int, into: dict) -> None:
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            if field == _F_SHAPE:
                into["shape"].append(value)
            continue
        if kind != _LEN:
            raise InvalidArgument("chunk", f"unexpected wire type {kind}")
        n, pos = _read_varint(buf, pos, end)
        if pos + n > end:
            raise InvalidArgument("chunk", "truncated field")
        if field == _F_DTYPE:
            into["dtype"] = bytes(buf[pos:pos + n]).decode()
        elif field == _F_SHAPE:  # packed
            p = pos
            while p < pos + n:
                value, p = _read_varint(buf, p, pos + n)
                into["shape"].append(value)
        elif field == _F_DATA:
            into["data"] = (pos, n)
        pos += n


def decode_chunk(raw: bytes, field: str = "values") -> tuple[int, torch.Tensor]:
    """The bytes of a FetchChunk -> (row_start, values), values a view of `raw`, validated."""
    buf = memoryview(raw)
    pos, end, row_start = 0, len(buf), 0
    tensor: dict = {"shape": [], "dtype": "", "data": (0, 0)}
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        f, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            if f == _F_ROW_START:
                row_start = value
            continue
        if kind != _LEN:
            raise InvalidArgument(field, f"unexpected wire type {kind}")
        n, pos = _read_varint(buf, pos, end)
        if pos + n > end:
            raise InvalidArgument(field, "truncated chunk")
        if f == _F_VALUES:
            _parse_tensor(buf, pos, pos + n, tensor)
        pos += n
    if tensor["dtype"] not in wire.DTYPES:
        raise InvalidArgument(field, f"unknown dtype {tensor['dtype']!r}")
    dtype, shape = wire.DTYPES[tensor["dtype"]], tuple(tensor["shape"])
    offset, nbytes = tensor["data"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != math.prod(shape) * itemsize:
        raise InvalidArgument(field, f"{nbytes} data bytes do not match shape {list(shape)} of {tensor['dtype']}")
    if nbytes == 0:
        return row_start, torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the view is ours alone
        t = torch.frombuffer(raw, dtype=dtype, count=nbytes // itemsize, offset=offset)
    return row_start, t.reshape(shape)


def encode_with_tensors(header, tensors: list[tuple[int, torch.Tensor]]) -> bytes:
    """encode_with_tensor for several Tensor fields of one message: each payload copied once."""
    parts = [header.SerializeToString()]
    for field, t in tensors:
        t = _host(t)
        meta = pb.Tensor(dtype=wire.dtype_name(t.dtype), shape=t.shape).SerializeToString()
        data = t.reshape(-1).view(torch.uint8).numpy()
        inner = meta + _varint(_F_DATA << 3 | _LEN) + _varint(data.nbytes)
        parts += [_varint(field << 3 | _LEN) + _varint(len(inner) + data.nbytes), inner, data]
    return b"".join(parts)


def split_tensor_data(raw: bytes, fields: frozenset[int], what: str = "request") -> tuple[bytes, dict]:
    """The bytes of a message -> (the same message without the `data` of its Tensor fields
    `fields`, {field: (offset, nbytes) of that data in raw}). The rest (dtype, shape, every
    other field) stays, so protobuf parses the header exactly as it would the whole message,
    and the payload is read in place (no copy). As protobuf does, the last `data` wins.
    Malformed bytes raise InvalidArgument(what)."""
    buf = memoryview(raw)
    pos, end = 0, len(buf)
    header, data = [], {}
    try:
        while pos < end:
            start = pos
            key, pos = _read_varint(buf, pos, end)
            f, kind = key >> 3, key & 7
            if kind == _VARINT:
                _, pos = _read_varint(buf, pos, end)
            elif kind == 1:
                pos += 8
            elif kind == 5:
                pos += 4
            elif kind == _LEN:
                n, pos = _read_varint(buf, pos, end)
                if pos + n > end:
                    raise InvalidArgument(what, "malformed message (truncated field)")
                if f in fields:
                    inner = _strip_data(buf, pos, pos + n, f, data)
                    header.append(_varint(key) + _varint(len(inner)) + inner)
                    pos += n
                    continue
                pos += n
            else:
                raise InvalidArgument(what, f"malformed message (wire type {kind})")
            if pos > end:
                raise InvalidArgument(what, "malformed message (truncated field)")
            header.append(bytes(buf[start:pos]))
    except InvalidArgument as exc:
        if exc.field != what:
            raise InvalidArgument(what, f"malformed message ({exc})") from None
        raise
    return b"".join(header), data


def _strip_data(buf: memoryview, pos: int, end: int, field: int, data: dict) -> bytes:
    """A Tensor's bytes without its data field(s); the data's place recorded in data[field]."""
    keep = []
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        f, kind = key >> 3, key & 7
        if kind == _VARINT:
            _, pos = _read_varint(buf, pos, end)
        elif kind == _LEN:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise InvalidArgument("chunk", "truncated field")
            if f == _F_DATA:
                data[field] = (pos, n)
                pos += n
                continue
            pos += n
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise InvalidArgument("chunk", f"unexpected wire type {kind}")
        if pos > end:
            raise InvalidArgument("chunk", "truncated field")
        keep.append(bytes(buf[start:pos]))
    return b"".join(keep)
