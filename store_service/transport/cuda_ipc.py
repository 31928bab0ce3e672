"""A staging buffer on the shard's GPU that a client process on the same host maps with
CUDA IPC (torch's own reduce_tensor / rebuild_cuda_tensor), and the interprocess event that
orders the shard's writes before the client's reads.

The handle travels as a JSON header (hex bytes, no pickle: the client never unpickles what
a server sends) over the handoff socket, against a one-time ticket. Without CUDA nothing here
is called: `available()` is False and the shard refuses the kind.

Ordering. The shard writes a piece on its current stream and records `event` there before it
answers; the client makes its stream wait for that event (GPU side, no host sync), copies the
piece out, and waits for its copy before it gives the slot back, so the shard's next write to
that slot cannot overtake the read. One event per session: a wait on a later record of it
covers every earlier write on the shard's stream too."""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

_STORAGE_CLASSES = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}


def available() -> bool:
    return torch.cuda.is_available()


def pin(host: torch.Tensor) -> bool:
    """Page-lock a host buffer in place (cudaHostRegister); False where that fails."""
    if not host.numel():
        return False
    try:
        return int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)) == 0
    except Exception:   # no CUDA runtime, or a mapping it will not lock: stay pageable
        return False


def unpin(host: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    except Exception:
        pass


class CudaStaging:
    """Shard side: `nbytes` on `device`, shareable, with an interprocess event."""

    def __init__(self, nbytes: int, device: torch.device):
        self.device = torch.device(device)
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.event = torch.cuda.Event(interprocess=True)
        with torch.cuda.device(self.device):
            self.event.record()   # an event must be recorded once before its handle is taken

    def header(self) -> dict:
        _, args = reduce_tensor(self.tensor)
        (_, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes, storage_offset,
         _, ref_handle, ref_offset, ev_handle, ev_sync) = args
        return {"size": list(size), "stride": list(stride), "offset": int(offset),
                "storage_cls": storage_cls.__name__, "device": int(device),
                "handle": bytes(handle).hex(), "storage_bytes": int(storage_bytes),
                "storage_offset": int(storage_offset),
                "ref_handle": bytes(ref_handle).hex() if ref_handle is not None else None,
                "ref_offset": int(ref_offset) if ref_offset is not None else 0,
                "ev_handle": bytes(ev_handle).hex() if ev_handle is not None else None,
                "ev_sync": bool(ev_sync),
                "event": bytes(self.event.ipc_handle()).hex()}

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        return _view(self.tensor, offset, dtype, shape)

    def written(self) -> None:
        """After a write into the buffer on the current stream: readers may go once it is done."""
        with torch.cuda.device(self.device):
            self.event.record()

    def close(self) -> None:
        self.tensor = None


class CudaMapped:
    """Client side: the shard's buffer mapped into this process, with its event."""

    def __init__(self, header: dict, device: torch.device | None = None):
        storage_cls = _STORAGE_CLASSES[header["storage_cls"]]
        dev = int(header["device"])
        self.tensor = rebuild_cuda_tensor(
            torch.Tensor, torch.Size(header["size"]), tuple(header["stride"]), header["offset"], storage_cls,
            torch.uint8, dev, bytes.fromhex(header["handle"]), header["storage_bytes"], header["storage_offset"],
            False, bytes.fromhex(header["ref_handle"]) if header["ref_handle"] else None, header["ref_offset"],
            bytes.fromhex(header["ev_handle"]) if header["ev_handle"] else None, header["ev_sync"])
        self.device = torch.device("cuda", dev)
        self.event = torch.cuda.Event.from_ipc_handle(self.device, bytes.fromhex(header["event"]))
        self.nbytes = self.tensor.numel()

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        return _view(self.tensor, offset, dtype, shape)

    def wait_written(self) -> None:
        """Make this process's current stream wait for the shard's writes so far."""
        torch.cuda.current_stream(self.device).wait_event(self.event)

    def close(self) -> None:
        self.tensor = None


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return buf[offset:offset + n * itemsize].view(dtype).view(*shape)
