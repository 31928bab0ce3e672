"""A remote shard that takes a bulk path for fetch, readout and row gradients when the shard
grants one, and gRPC otherwise: every other call, and every call after the path is lost.

    shard = FastRemoteShard(RemoteShard(address, admin_token=token), token)
    shard.kind         # "shm", "cuda_ipc", "torch_dist" or "grpc"
    Table([shard, ...])

A call whose path fails with ShardUnavailable (the shard died or restarted) or NotFound (its
session is gone) is made again over gRPC, so the caller sees exactly what the gRPC path says:
the same result, or the same domain error after its retries. Gradients keep their request id
for that second try, so the shard accumulates them once."""
from __future__ import annotations

import logging
import uuid

import torch

from store_service import errors
from store_service.transport.client import open_path
from store_service.transport.config import ClientConfig

log = logging.getLogger(__name__)


class FastRemoteShard:
    def __init__(self, remote, token: str, config: ClientConfig = ClientConfig()):
        self.remote = remote
        self.path = open_path(remote.address, token, config, getattr(remote, "_tls", None))   # the gRPC side's TLS too

    def __getattr__(self, name):
        return getattr(self.remote, name)

    @property
    def kind(self) -> str:
        return self.path.kind if self.path is not None else "grpc"

    def _via(self, on_path, on_grpc):
        path = self.path
        if path is not None:
            try:
                return on_path(path)
            except (errors.ShardUnavailable, errors.NotFound) as exc:
                log.warning("bulk path %s to %s lost (%s); using gRPC", path.kind, self.remote.address, exc)
                self.path = None
                try:
                    path.close()
                except Exception:
                    pass
        return on_grpc()

    def fetch(self, ids: torch.Tensor, *, hits=None, weight_sum=None, version: int = 0) -> torch.Tensor:
        out_dtype = torch.bfloat16 if self.remote.readout_wire_dtype == "bfloat16" else None
        return self._via(lambda p: p.fetch(ids, hits=hits, weight_sum=weight_sum, out_dtype=out_dtype,
                                           version=version),
                         lambda: self.remote.fetch(ids, hits=hits, weight_sum=weight_sum, version=version))

    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, version: int = 0) -> torch.Tensor:
        return self._via(lambda p: p.readout(ids, weights, out_dtype=self.remote.readout_wire_dtype,
                                             compact=self.remote.compact_readout, version=version),
                         lambda: self.remote.readout(ids, weights, version=version))

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "", version: int = 0) -> torch.Tensor:
        rid = request_id or uuid.uuid4().hex
        return self._via(lambda p: p.readout_backward(ids, weights, grad_out, request_id=rid,
                                                      out_dtype=self.remote.readout_wire_dtype,
                                                      compact=self.remote.compact_readout, version=version),
                         lambda: self.remote.readout_backward(ids, weights, grad_out, request_id=rid, version=version))

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str = "",
                               version: int = 0) -> None:
        rid = request_id or uuid.uuid4().hex
        wire_grads = grads.to(torch.bfloat16) if self.remote.readout_wire_dtype == "bfloat16" else grads
        self._via(lambda p: p.accumulate_value_grads(ids, wire_grads, request_id=rid, version=version),
                  lambda: self.remote.accumulate_value_grads(ids, grads, request_id=rid, version=version))

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *, request_id: str = "",
                             version: int = 0) -> None:
        rid = request_id or uuid.uuid4().hex
        self._via(lambda p: p.accumulate_key_grads(ids, grads, request_id=rid, version=version),
                  lambda: self.remote.accumulate_key_grads(ids, grads, request_id=rid, version=version))

    def close(self) -> None:
        if self.path is not None:
            self.path.close()
            self.path = None
        self.remote.close()
