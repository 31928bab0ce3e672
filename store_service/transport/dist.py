"""Across hosts: a 2-rank torch.distributed process group per (client, shard) pair, gloo for
rows in host memory, NCCL for rows on GPUs. Rank 0 is the shard, rank 1 the client.

The group is not torch.distributed's global one (a shard serves many clients, a client many
shards): each session builds its own `ProcessGroupGloo` / `ProcessGroupNCCL` over a TCPStore
the shard opens on a free port, under a key prefix that is the session's one-time ticket (the
shard hands port and ticket out only through an authenticated gRPC call; a peer that knows
the port but not the prefix meets nobody). Tensors then move with the group's send/recv, the
transports made for them (NCCL over NVLink/InfiniBand, gloo over TCP).

Shard -> client (fetch, readout): the shard posts its send, then answers the gRPC call; a call
refused by validation sends nothing, and the client posts its receive only for a call that
succeeded. Client -> shard (gradients): the client posts its send first, then calls; the shard
receives inside the call. Gloo matches messages by tag, so calls may be in flight together;
NCCL ignores tags and pairs messages in order, so a client on NCCL keeps one call in flight
(`BulkPath`)."""
from __future__ import annotations

import datetime
import logging
import queue
import socket
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


def available(backend: str) -> bool:
    if not dist.is_available():
        return False
    if backend == "gloo":
        return dist.is_gloo_available()
    return backend == "nccl" and dist.is_nccl_available() and torch.cuda.is_available()


def open_store(host: str) -> dist.TCPStore:
    """The shard's side of the rendezvous, on a free port of `host`."""
    return dist.TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)


def make_group(store: dist.Store, prefix: str, rank: int, backend: str, timeout_s: float, host: str):
    """This side's end of the session's 2-rank group (blocks until both ends are in)."""
    prefixed = dist.PrefixStore(prefix, store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # The interface the shard's gRPC host resolves to, not whatever the host name does.
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)


def local_address_towards(host: str, port: int) -> str:
    """This host's address on the route to host:port (the interface gloo should bind)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


class Sender:
    """Shard side: posts each send at once (from the calling thread) and waits for them in a
    thread of its own, so a send the client has not yet asked for never holds up another: the
    client receives by tag, in whatever order its calls finish."""

    def __init__(self, group):
        self._group = group
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kstore-dist-send", daemon=True)
        self._thread.start()

    def send(self, tensor: torch.Tensor, tag: int) -> None:
        with self._lock:
            work = self._group.send([as_bytes(tensor)], 1, tag)
        self._queue.put((work, tensor, tag))   # the tensor lives until its send is done

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, _, tag = item
            try:
                work.wait()
            except Exception:   # the peer is gone or timed out: nothing more can reach it
                log.warning("dist send of tag %d failed; the session's group is unusable", tag, exc_info=True)

    def close(self) -> None:
        self._queue.put(None)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes (every dtype travels the same way, bfloat16 included)."""
    return t.reshape(-1).view(torch.uint8)
