"""A model worker as a Ray actor: trains or generates against the store
cluster's shard map (through a FollowingTable), with no store logic of its own.

Training survives a shard crash: the table raises ShardRestarted (or the
shard stays unreachable), the worker waits for Ray to restart the shard and
the registry to show it, then resumes from the last consistent checkpoint
(model weights + the store version published at that step).
"""
from __future__ import annotations

import logging
import os
import time

import ray

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class WorkerActor:
    def __init__(self, admin_token: str, rank: int = 0, world_size: int = 1, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.admin_token = admin_token
        self.rank, self.world_size = rank, world_size
        self.model = None
        self.tokenizer = None
        self.recoveries = 0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def _table(self, on_restart: str):
        from .following_table import FollowingTable
        return FollowingTable(admin_token=self.admin_token, on_restart=on_restart,
                              store_root=self._store_root)

    def train(self, train_config: dict, store_root: str, resume: str | None = None,
              max_recoveries: int = 3) -> dict:
        """Run model_worker.train against the cluster's store. Returns the run's
        summary (losses, tokens/s, evals) and keeps the model for `answer`."""
        from model_worker.checkpoint import latest_checkpoint
        from model_worker.train import TrainConfig, train
        from store_service import errors

        from .following_table import ShardRestarted

        self._store_root = os.path.abspath(store_root)
        cfg = TrainConfig(**train_config)
        table = self._table("raise")
        while True:
            try:
                result = train(cfg, table=table, resume=resume)
                break
            except (ShardRestarted, errors.ShardUnavailable) as e:
                if self.recoveries >= max_recoveries:
                    raise
                self.recoveries += 1
                ckpt = latest_checkpoint(cfg.out_dir)
                if ckpt is None:
                    raise RuntimeError(f"a shard failed ({e}) before the first checkpoint; "
                                       "nothing consistent to resume from") from e
                log.warning("worker %d: %s; resuming from %s", self.rank, e, ckpt)
                _wait_for_restarted_shards(table)
                resume = str(ckpt)
        table.on_restart = "follow"  # from here on the model only reads: follow restarts
        self.model = result.pop("model").eval()
        from model_worker.data import ByteTokenizer
        self.tokenizer = ByteTokenizer()
        return {"losses": result["losses"], "start_step": result["start_step"],
                "final_loss": result["final_loss"], "tokens_per_s": result["tokens_per_s"],
                "evals": result["evals"], "recoveries": self.recoveries, "params": result["params"]}

    def load(self, checkpoint: str) -> None:
        """Serve a checkpoint: its model, against the cluster's store (follows swaps and scaling)."""
        from model_worker.checkpoint import load_model, read_meta
        from model_worker.config import ModelConfig
        from model_worker.data import tokenizer_from_dict
        from model_worker.model import Transformer

        meta = read_meta(checkpoint)
        self._store_root = meta["store_root"]
        cfg = ModelConfig.from_dict(meta["model_config"])
        table = self._table("follow") if cfg.knowledge is not None else None
        self.model = Transformer(cfg, table)
        load_model(self.model, os.path.join(checkpoint, "model.safetensors"), strict=True)
        self.model.eval()
        self.tokenizer = tokenizer_from_dict(meta["tokenizer"])

    def answer(self, questions: list[str], max_new_tokens: int = 24) -> list[str]:
        from model_worker.generate import answer
        return answer(self.model, self.tokenizer, list(questions), max_new_tokens)

    def rows_used(self, question: str, top: int = 5) -> dict:
        """For the first answer token: the rows each knowledge layer read, with weights."""
        import torch

        from model_worker.generate import generate
        prompt = torch.tensor([self.tokenizer.encode(question, bos=True)])
        gen = generate(self.model, prompt, 1, record=True)
        out = {}
        for layer, (ids, w) in gen.rows.items():
            flat_ids, flat_w = ids[0, -1].flatten(), w[0, -1].flatten()
            best = flat_w.topk(min(top, flat_w.numel()))
            out[int(layer)] = [(int(flat_ids[i]), round(float(v), 4)) for v, i in zip(best.values, best.indices)]
        return out


def _wait_for_restarted_shards(table, timeout_s: float = 120.0) -> None:
    """Block until every shard of the bound map answers again (Ray restarts it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            table.sync()
        except Exception:  # ShardRestarted is expected here: we are recovering from it
            pass
        if all(s.health() for s in table.shards):
            return
        time.sleep(0.2)
    raise TimeoutError(f"shards did not come back within {timeout_s}s")
