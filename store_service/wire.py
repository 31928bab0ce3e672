"""Tensor <-> `knowledge_store.v1.Tensor` conversion: the only place tensors meet bytes.

A Tensor message is raw little-endian bytes, row-major, with dtype and shape
beside them (DESIGN.md section 5). Encoding makes one copy (tensor -> bytes);
decoding makes none beyond the bytes object protobuf hands us: the tensor is
a view of it (`torch.frombuffer`), which keeps it alive.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

from protos import knowledge_store_pb2 as pb
from store_service.errors import InvalidArgument

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
        # pageable buffer measured 8x slower per byte for an 8 MB readout on an H200 host.
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
    if ids.dtype == torch.int64 and ids.numel() and -1 <= int(ids.min()) and int(ids.max()) <= INT32_MAX:
        ids = ids.to(torch.int32)
    return to_proto(ids, out)


def from_proto(msg: pb.Tensor, field: str, *, dtypes: tuple[str, ...] | None = None,
               ndim: int | None = None, ids: bool = False) -> torch.Tensor:
    """Tensor message -> tensor, validated. Errors raise InvalidArgument naming `field`.

    dtypes: accepted dtype names (None: any known). ndim: required rank.
    ids: accept int32 or int64 and return int64.
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
    data = msg.data  # a fresh bytes object owned by this call
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise InvalidArgument(field, f"{len(data)} data bytes do not match shape {list(shape)} "
                                     f"of {msg.dtype} ({expected} bytes)")
    if expected == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        with warnings.catch_warnings():
            # frombuffer warns that `bytes` is read-only; the buffer is ours alone.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(data, dtype=dtype).reshape(shape)
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
