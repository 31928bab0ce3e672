"""The client's end of a session: how the tensor of a finished call is taken out of its
placement, and how a tensor is put in one before a call. One class per kind:

    ShmEnd    the memfd mapped here; taking is one host copy out of shared memory
    CudaEnd   the shard's GPU buffer mapped here (CUDA IPC); ordered by its event
    DistEnd   rank 1 of the session's group; taking is a receive, putting a send
"""
from __future__ import annotations

import datetime

import torch

from store_service.transport import cuda_ipc, dist
from store_service.transport.shm import SharedBuffer


class ShmEnd:
    kind = "shm"

    def __init__(self, fd: int, lease, device: str = "cpu"):
        self.buffer = SharedBuffer.attach(fd)
        self._lease = lease   # open while we hold the buffer (handoff.receive)
        self.nbytes = self.buffer.nbytes
        self.device = torch.device(device)
        # Results for a GPU: page-lock the mapping so rows cross PCIe once, at its speed.
        self._gpu = self.device.type == "cuda"
        self._pinned = self._gpu and cuda_ipc.pin(self.buffer.tensor)

    def take(self, slot, dest: torch.Tensor) -> None:
        dest.copy_(self.buffer.view(slot.offset, dest.dtype, dest.shape), non_blocking=self._pinned)
        if self._gpu:   # the slot is given back after this: the copy must be done
            torch.cuda.current_stream(self.device).synchronize()

    def put(self, slot, src: torch.Tensor):
        self.buffer.view(slot.offset, src.dtype, src.shape).copy_(src)
        return None

    def close(self) -> None:
        if self._pinned:
            cuda_ipc.unpin(self.buffer.tensor)
        self.buffer.close()
        self._lease.close()


class CudaEnd:
    kind = "cuda_ipc"

    def __init__(self, header: dict, lease):
        self.buffer = cuda_ipc.CudaMapped(header)
        self._lease = lease
        self.nbytes = self.buffer.nbytes
        self.device = self.buffer.device

    def take(self, slot, dest: torch.Tensor) -> None:
        with torch.cuda.device(self.buffer.device):
            self.buffer.wait_written()
            dest.copy_(self.buffer.view(slot.offset, dest.dtype, dest.shape))
            # The slot is given back after this: the shard's next write must not overtake the copy.
            torch.cuda.current_stream(self.buffer.device).synchronize()

    def put(self, slot, src: torch.Tensor):
        with torch.cuda.device(self.buffer.device):
            self.buffer.view(slot.offset, src.dtype, src.shape).copy_(src)
            torch.cuda.current_stream(self.buffer.device).synchronize()   # written before the call names it
        return None

    def close(self) -> None:
        self.buffer.close()
        self._lease.close()


class DistEnd:
    kind = "torch_dist"

    def __init__(self, host: str, port: int, prefix: str, backend: str, timeout_s: float):
        local = dist.local_address_towards(host, port)
        store = torch.distributed.TCPStore(host, port, 2, False, timeout=datetime.timedelta(seconds=timeout_s))
        self.group = dist.make_group(store, prefix, 1, backend, timeout_s, local)
        self._store = store
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def take(self, slot, dest: torch.Tensor) -> None:
        if dest.numel():
            self.group.recv([dist.as_bytes(dest)], 0, slot.tag).wait()

    def put(self, slot, src: torch.Tensor):
        """Posts the send; the caller waits on what this returns after its call."""
        if not src.numel():
            return None
        return self.group.send([dist.as_bytes(src.contiguous())], 0, slot.tag)

    def close(self) -> None:
        self.group = None
