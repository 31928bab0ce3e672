"""Data parallelism for the model side: W workers, one store.

Each worker computes the gradient of its own micro-batch. Model gradients
are summed across workers with torch.distributed (gloo on CPU, NCCL on GPU);
row gradients need no collective at all: every worker sends its own to the
shards, which sum them and apply the step once all W have arrived at the
step barrier (`table.end_step(step, worker=rank, num_workers=W)`).
The loss is scaled by 1/W so both halves see the mean over the global batch.

The balancing loads (MoE experts, product sub-keys) are summed too, so every
replica moves its biases identically and the replicas never drift apart.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOAD_BUFFERS = ("load", "load_a", "load_b")


@dataclass
class DataParallel:
    rank: int
    world_size: int

    @staticmethod
    def init(rank: int, world_size: int, master_addr: str, master_port: int,
             backend: str = "gloo", timeout_s: float = 300.0) -> "DataParallel":
        """Join the process group (idempotent for the same rank and world)."""
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                    world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        return DataParallel(rank, world_size)

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum every parameter gradient over the workers, in one flat buffer."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_reduce_loads(self, model: torch.nn.Module) -> None:
        """Sum the step's balancing loads over the workers before the biases move."""
        for name, buf in model.named_buffers():
            if name.rsplit(".", 1)[-1] in LOAD_BUFFERS:
                dist.all_reduce(buf)

    def barrier(self) -> None:
        dist.barrier()

    @staticmethod
    def shutdown() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
