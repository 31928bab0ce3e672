"""The shard's side of a bulk-data session: where a call's tensor is written or read.

Three kinds, one interface, so the servicer (`service`) is written once:
    out_tensor(at, dtype, shape)   where the shard writes a tensor for the client
    sent(at, tensor)               after the write: order it (cuda_ipc) or send it (dist)
    in_tensor(at, dtype, shape)    a copy the shard owns of the tensor the client put there
Every placement is checked against the session's buffer or call limit before anything is
touched; a bad one is InvalidArgument naming `at`."""
from __future__ import annotations

import math
import threading
import time

import torch

from store_service import errors
from store_service.transport import cuda_ipc, dist
from store_service.transport.shm import SharedBuffer

ALIGN = 64   # placements start on this many bytes: any dtype's view is aligned


def nbytes_of(dtype: torch.dtype, shape) -> int:
    return math.prod(int(s) for s in shape) * torch.empty(0, dtype=dtype).element_size()


class Session:
    kind = ""

    def __init__(self, session_id: str):
        self.id = session_id
        self.last_used = time.monotonic()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def close(self) -> None:
        pass


class _BufferSession(Session):
    """shm and cuda_ipc: tensors live at placements in one staging buffer."""

    buffer = None

    def _view(self, at, dtype, shape) -> torch.Tensor:
        n = nbytes_of(dtype, shape)
        size = self.buffer.tensor.numel()
        if at.offset < 0 or at.offset % ALIGN or at.capacity < n or at.offset + at.capacity > size:
            raise errors.InvalidArgument("at", f"placement [{at.offset}, +{at.capacity}) cannot hold {n} bytes "
                                               f"in a {size}-byte buffer (offsets are multiples of {ALIGN})")
        return self.buffer.view(at.offset, dtype, shape)

    def out_tensor(self, at, dtype, shape, device) -> torch.Tensor:
        return self._view(at, dtype, shape)

    def sent(self, at, tensor) -> None:
        pass

    def in_tensor(self, at, dtype, shape, device) -> torch.Tensor:
        return self._view(at, dtype, shape).to(device, copy=True)


class ShmSession(_BufferSession):
    kind = "shm"

    def __init__(self, session_id: str, nbytes: int, device: torch.device = torch.device("cpu")):
        super().__init__(session_id)
        self.buffer = SharedBuffer.create(nbytes)
        # Rows on a GPU reach the buffer by a device-to-host copy: page-locked, it runs at the
        # link's speed instead of through a pageable bounce buffer.
        self._pinned = device.type == "cuda" and cuda_ipc.pin(self.buffer.tensor)

    def grant(self) -> tuple[dict, list[int]]:
        return {"kind": self.kind, "session": self.id, "nbytes": self.buffer.nbytes}, [self.buffer.fd]

    def close(self) -> None:
        if self._pinned:
            cuda_ipc.unpin(self.buffer.tensor)
        self.buffer.close()


class CudaSession(_BufferSession):
    kind = "cuda_ipc"

    def __init__(self, session_id: str, nbytes: int, device: torch.device):
        super().__init__(session_id)
        self.buffer = cuda_ipc.CudaStaging(nbytes, device)

    def grant(self) -> tuple[dict, list[int]]:
        return {"kind": self.kind, "session": self.id, **self.buffer.header()}, []

    def sent(self, at, tensor) -> None:
        self.buffer.written()

    def close(self) -> None:
        self.buffer.close()


class DistSession(Session):
    """The shard's end of a 2-rank group; built in the background while the client joins."""
    kind = "torch_dist"

    def __init__(self, session_id: str, backend: str, host: str, prefix: str, max_bytes: int, timeout_s: float):
        super().__init__(session_id)
        self.backend, self.max_bytes, self.timeout_s = backend, max_bytes, timeout_s
        self.store = dist.open_store(host)
        self.port = self.store.port
        self._ready = threading.Event()
        self._group = None
        self._sender = None
        self._failure = ""
        self._lock = threading.Lock()   # one receive at a time: tags keep order, this keeps gloo's pair simple
        self._host, self._prefix = host, prefix
        threading.Thread(target=self._build, args=(host, prefix), name="kstore-dist-group", daemon=True).start()

    def _build(self, host: str, prefix: str) -> None:
        try:
            self._group = dist.make_group(self.store, prefix, 0, self.backend, self.timeout_s, host)
            self._sender = dist.Sender(self._group)
        except Exception as exc:   # the client never came, or the backend failed
            self._failure = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def _group_ready(self):
        if not self._ready.wait(self.timeout_s) or self._group is None:
            raise errors.FailedPrecondition(f"session {self.id}: its process group is not up "
                                            f"({self._failure or 'the client has not joined'})")
        return self._group

    def _check(self, at, dtype, shape) -> None:
        n = nbytes_of(dtype, shape)
        if at.tag <= 0 or n > self.max_bytes:
            raise errors.InvalidArgument("at", f"tag must be > 0 (got {at.tag}) and a call moves at most "
                                               f"{self.max_bytes} bytes (asked {n})")

    def out_tensor(self, at, dtype, shape, device) -> torch.Tensor:
        self._check(at, dtype, shape)
        self._group_ready()
        return torch.empty(shape, dtype=dtype, device=device if self.backend == "nccl" else "cpu")

    def sent(self, at, tensor) -> None:
        if tensor.numel():   # nothing travels for an empty answer; the client posts no receive
            self._sender.send(tensor, int(at.tag))

    def in_tensor(self, at, dtype, shape, device) -> torch.Tensor:
        self._check(at, dtype, shape)
        group = self._group_ready()
        buf = torch.empty(shape, dtype=dtype, device=device if self.backend == "nccl" else "cpu")
        if not buf.numel():
            return buf.to(device)
        with self._lock:
            group.recv([dist.as_bytes(buf)], 1, int(at.tag)).wait()
        return buf.to(device)

    def close(self) -> None:
        if not self._ready.is_set() and self.backend == "gloo":
            # Nobody joined: stand in for the client so the builder returns now, not at its
            # timeout (a thread blocked in gloo's constructor at interpreter exit aborts it).
            def stand_in():
                try:
                    dist.make_group(self.store, self._prefix, 1, "gloo", 10.0, self._host)
                except Exception:
                    pass
            threading.Thread(target=stand_in, daemon=True).start()
            self._ready.wait(15.0)
        if self._sender is not None:
            self._sender.close()

