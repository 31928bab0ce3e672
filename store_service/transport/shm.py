"""A staging buffer in shared host memory: an anonymous memfd, mapped by the shard that
creates it and by the one client it is handed to (`handoff`), seen by both as a uint8
tensor. No name in /dev/shm, nothing to clean up: the memory goes with the last mapping."""
from __future__ import annotations

import mmap
import os

import torch


class SharedBuffer:
    """`nbytes` of shared memory; `.tensor` is a uint8 view of all of it."""

    def __init__(self, fd: int, nbytes: int):
        self.fd = fd
        self.nbytes = nbytes
        self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, nbytes: int, name: str = "kstore-staging") -> "SharedBuffer":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            return cls(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> "SharedBuffer":
        """Map a buffer whose fd was handed over (this object then owns the fd)."""
        return cls(fd, os.fstat(fd).st_size)

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """The bytes at `offset` as a tensor of dtype and shape (no copy; the caller checked bounds)."""
        n = 1
        for s in shape:
            n *= int(s)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return self.tensor[offset:offset + n * itemsize].view(dtype).view(*shape)

    def close(self) -> None:
        self.tensor = None
        try:
            self._map.close()
        except BufferError:   # a view is still alive somewhere: the mapping goes when it does
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
