"""The transports as the store's DataPath seam sees them (store_service.datapath): a server
end per kind that opens a session inside the store's authenticated OpenDataPath call, a client
end that joins it, and the DataPath calls over a `BulkPath`. Registered at import of this
package where the seam exists."""
from __future__ import annotations

import dataclasses

import torch

from store_service import errors
from store_service.transport import cuda_ipc, dist
from store_service.transport.client import BulkPath
from store_service.transport.config import ClientConfig
from store_service.transport.registry import KINDS, SessionTable


class PathServer:
    """`DataPathServer` of one kind for one shard: sessions in the shard's `SessionTable`."""

    def __init__(self, shard, kind: str):
        self.kind = kind
        self._table = SessionTable.of(shard)

    def open(self, client, server, params) -> dict[str, str] | None:
        try:
            got = self._table.open(self.kind, client.host_id, int(params.get("buffer_bytes", "0") or 0),
                                   params.get("backend", "gloo"))
        except errors.FailedPrecondition:
            return None   # not for this pair (another host, no GPU, no backend)
        return {k: str(v) for k, v in got.items()}

    def close(self) -> None:
        self._table.close_all()


class PathClient:
    """`DataPathClient` of one kind."""

    def __init__(self, kind: str, config: ClientConfig = ClientConfig()):
        self.kind = kind
        self.config = config
        self._device = "cpu"   # where shm results land: the client endpoint's device, once params() saw it

    def params(self, client) -> dict[str, str]:
        backend = "nccl" if self.kind == "torch_dist" and str(client.device).startswith("cuda") else "gloo"
        self._device = str(client.device) if self.kind == "shm" else "cpu"
        return {"buffer_bytes": str(self.config.buffer_bytes), "backend": backend}

    def connect(self, params, *, shard_id: int, address: str, timeout_s: float, metadata: tuple = (),
                tls=None) -> "Path":
        cfg = dataclasses.replace(self.config, timeout_s=timeout_s, dist_backend=params.get("backend", "gloo"),
                                  device=self._device)
        return Path(BulkPath.connect(address, self.kind, params, cfg, metadata=metadata, tls=tls))


class Path:
    """`DataPath` over a BulkPath."""

    def __init__(self, bulk: BulkPath):
        self.kind = bulk.kind
        self._bulk = bulk

    def fetch(self, ids, *, hits=None, weight_sum=None, out_dtype=None, version: int = 0) -> torch.Tensor:
        return self._bulk.fetch(ids, hits=hits, weight_sum=weight_sum, out_dtype=out_dtype, version=version)

    def readout(self, ids, weights, *, out_dtype=torch.float32, version: int = 0) -> torch.Tensor:
        wire_dtype = "bfloat16" if out_dtype == torch.bfloat16 else "float32"
        return self._bulk.readout(ids, weights, out_dtype=wire_dtype, version=version).to(out_dtype)

    def accumulate_value_grads(self, ids, grads, *, request_id: str, version: int = 0) -> None:
        self._bulk.accumulate_value_grads(ids, grads, request_id=request_id, version=version)

    def readout_backward(self, ids, weights, grad_out, *, request_id: str, version: int = 0) -> torch.Tensor:
        # grad_out through the buffer (or the group), in its own dtype; grad_weights in the reply
        wire_dtype = "bfloat16" if grad_out.dtype == torch.bfloat16 else "float32"
        return self._bulk.readout_backward(ids, weights, grad_out, request_id=request_id, out_dtype=wire_dtype,
                                           version=version)

    def close(self) -> None:
        self._bulk.close()


def _available(kind: str) -> bool:
    if kind == "cuda_ipc":
        return cuda_ipc.available()
    if kind == "torch_dist":
        return dist.available("gloo")
    return hasattr(__import__("os"), "memfd_create")


def register() -> None:
    """Register every kind with store_service.datapath, where that seam exists."""
    try:
        from store_service import datapath
    except ImportError:
        return
    for kind in KINDS:
        datapath.register_transport(datapath.Transport(
            kind=kind, server=lambda shard, k=kind: PathServer(shard, k), client=lambda k=kind: PathClient(k),
            available=lambda k=kind: _available(k)))
