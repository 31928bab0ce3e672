"""A model worker as a Ray actor: trains or generates against the store
cluster's shard map (through a FollowingTable), with no store logic of its own.

- Data parallel: W worker actors join one torch.distributed group (gloo on
  CPU); model gradients are all-reduced, row gradients go to the shards, whose
  step barrier applies them once all W workers have arrived.
- Scaling while training: `scale_at={step: shards}` re-partitions the store
  between two steps (rank 0 does it; every rank follows the registry).
- Training survives a shard crash: the table raises ShardRestarted (or the
  shard stays unreachable), the worker waits for Ray to restart the shard and
  the registry to show it, then resumes from the last consistent checkpoint
  (model weights + the store version published at that step).
"""
from __future__ import annotations

import logging
import os
import socket
import time

import ray

log = logging.getLogger(__name__)


class ProgressReport:
    """tqdm's interface, as far as training uses it, recording where the run is;
    the driver polls `WorkerActor.progress()` and draws the bar itself (a bar
    drawn inside an actor would reach the driver as a stream of log lines)."""

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, iterable, initial: int = 0, total: int | None = None, disable: bool = False,
                 desc: str | None = None) -> "ProgressReport":
        self.state.update(step=initial, total=total, desc=desc or "", postfix={}, active=not disable)
        self._it = iterable
        return self

    def __iter__(self):
        for item in self._it:
            yield item
            self.state["step"] += 1

    def set_postfix(self, **kw) -> None:
        self.state["postfix"] = kw


@ray.remote(max_restarts=0, concurrency_groups={"monitor": 1})
class WorkerActor:
    def __init__(self, admin_token: str, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.admin_token = admin_token
        self.model = None
        self.tokenizer = None
        self.recoveries = 0
        self._store_root = ""
        self._progress: dict = {"step": 0, "total": None, "desc": "", "postfix": {}, "active": False}

    @ray.method(concurrency_group="monitor")
    def progress(self) -> dict:
        """Where training is (answered while `train` runs, from its own thread)."""
        return dict(self._progress, recoveries=self.recoveries)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def free_port(self) -> tuple[str, int]:
        """An address for the torch.distributed rendezvous, on this worker's node."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]

    def _table(self, on_restart: str):
        from .following_table import FollowingTable
        return FollowingTable(admin_token=self.admin_token, on_restart=on_restart,
                              store_root=self._store_root)

    def train(self, train_config: dict, cluster_config: dict, resume: str | None = None, *,
              data_parallel: tuple[int, int, str, int] | None = None, scale_at: dict[int, int] | None = None,
              max_recoveries: int = 3, return_state: bool = False) -> dict:
        """Run model_worker.train against the cluster's store. Returns the run's
        summary (losses, tokens/s, evals) and keeps the model for `answer`.
        data_parallel: (rank, world_size, master_addr, master_port).
        Poll `progress()` meanwhile (see `follow_training`)."""
        from model_worker.checkpoint import latest_checkpoint
        from model_worker.distributed import DataParallel
        from model_worker.train import TrainConfig, train
        from store_service import errors

        from .config import ClusterConfig
        from .following_table import ShardRestarted

        ccfg = ClusterConfig.from_dict(cluster_config)
        ccfg.admin_token = ccfg.admin_token or self.admin_token   # to_dict leaves file-held tokens out
        self._store_root = os.path.abspath(ccfg.store_root)
        cfg = TrainConfig(**train_config)
        dp = DataParallel.init(*data_parallel) if data_parallel is not None else None
        table = self._table("raise")
        hook = _scaler(ccfg, scale_at, table, dp) if scale_at else None
        progress = ProgressReport(self._progress)
        try:
            while True:
                try:
                    result = train(cfg, table=table, resume=resume, data_parallel=dp, step_hook=hook,
                                   progress_bar=progress)
                    break
                except (ShardRestarted, errors.ShardUnavailable, errors.ShardsDisagree) as e:
                    if self.recoveries >= max_recoveries or dp is not None:
                        raise  # data-parallel recovery restarts the whole group: the caller's job
                    self.recoveries += 1
                    ckpt = latest_checkpoint(cfg.out_dir)
                    if ckpt is None:
                        raise RuntimeError(f"a shard failed ({e}) before the first checkpoint; "
                                           "nothing consistent to resume from") from e
                    log.warning("%s; resuming from %s", e, ckpt)
                    _wait_for_restarted_shards(table)
                    resume = str(ckpt)
        finally:
            if dp is not None:
                dp.shutdown()
        table.on_restart = "follow"  # from here on the model only reads: follow restarts
        self.model = result.pop("model").eval()
        from model_worker.data import ByteTokenizer
        self.tokenizer = ByteTokenizer()
        return {"losses": result["losses"], "start_step": result["start_step"],
                "final_loss": result["final_loss"], "tokens_per_s": result["tokens_per_s"],
                "evals": result["evals"], "recoveries": self.recoveries, "params": result["params"],
                "table_step": table.info().step, "num_shards": len(table.shards),
                "model_state": dict(self.model.state_dict()) if return_state else None}

    def load(self, checkpoint: str) -> None:
        """Serve a checkpoint: its model, against the cluster's store (follows swaps and scaling)."""
        from model_worker.checkpoint import load_weights, read_meta
        from model_worker.config import ModelConfig
        from model_worker.data import tokenizer_from_dict
        from model_worker.model import Transformer

        meta = read_meta(checkpoint)
        self._store_root = meta["store_root"]
        cfg = ModelConfig.from_dict(meta["model_config"])
        table = self._table("follow") if cfg.knowledge is not None else None
        self.model = Transformer(cfg, table)
        load_weights(self.model, os.path.join(checkpoint, "model.safetensors"))
        self.model.eval()
        self.tokenizer = tokenizer_from_dict(meta["tokenizer"])

    def answer(self, questions: list[str], max_new_tokens: int = 24) -> list[str]:
        """Greedy answers, reading the rows the store serves now: what other clients
        changed (ablations, swaps, new rows) is re-read first."""
        from model_worker.generate import answer
        self.model.refresh_table_state()
        return answer(self.model, self.tokenizer, list(questions), max_new_tokens)

    def rows_behind(self, facts: list[tuple[str, str]], per_fact: int = 64) -> list[list[int]]:
        """For each (prompt, answer): the `per_fact` rows with the most readout weight
        over the positions that predict the answer (interpret.answer_rows), best first."""
        from model_worker.interpret import answer_rows
        from model_worker.learn import TextFact
        self.model.refresh_table_state()
        examples = [TextFact(p, " " + a, a) for p, a in facts]
        return [ids.tolist() for ids in answer_rows(self.model, self.tokenizer, examples, per_fact=per_fact)]

    def learn(self, lines: list[str], corpus: str, learn_config: dict, background_batches: int = 32) -> dict:
        """Teach the served model new facts ('prompt<TAB>answer<TAB>subject' lines) as new
        rows of the cluster's table, while it serves (model_worker.learn, method new_rows:
        the model and the old rows stay as they are). Publishes a new store version."""
        from model_worker.data import PackedLoader, build_corpus
        from model_worker.learn import LearnConfig, facts_from_lines, learn
        self.model.refresh_table_state()
        table = self.model.tables()[0]
        # old text calibrates the new keys, so that it does not select the new rows
        bg = PackedLoader(build_corpus(corpus).train_texts, self.tokenizer, 64, 16, seed=1)
        res = learn(self.model, table, facts_from_lines(lines), self.tokenizer, LearnConfig(**learn_config),
                    background=[bg.batch(i) for i in range(background_batches)], publish=True)
        self.model.eval()
        return {"new_rows": int(res.new_ids.numel()), "version": res.version, "seconds": res.seconds,
                "loss_first": res.losses[0], "loss_last": res.losses[-1],
                "cue_rows": res.info.get("cue_rows", 0), "link_rows": res.info.get("link_rows", 0),
                "gated_rows": res.info.get("gated_rows", 0)}

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


def _scaler(config, scale_at: dict[int, int], table, dp):
    """A step hook that re-partitions the store at the scheduled steps. Every
    worker stops between the two steps (so no gradient reaches the old shards
    after the snapshot), rank 0 scales, and every worker rebinds its table to
    the new shards before the next step."""
    def hook(done: int) -> None:
        if done not in scale_at:
            return
        if dp is not None:
            dp.barrier()
        if dp is None or dp.rank == 0:
            from .launch import attach
            attach(config).scale(int(scale_at[done]), drain_s=1.0)
        if dp is not None:
            dp.barrier()
        table.sync(wait_for_change=True)
    return hook


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


def follow_training(worker, pending, poll_s: float = 0.5):
    """Draw a worker's training progress here, in the driver, until `pending`
    (its `train` call) finishes; returns its result."""
    from model_worker.progress import progress_bar

    bar, finished = None, False
    while True:
        done, _ = ray.wait([pending], timeout=poll_s)
        p = ray.get(worker.progress.remote())
        if p["active"] and p["total"] and not finished:
            if bar is None:
                bar = progress_bar(total=p["total"], initial=p["step"], desc=p["desc"])
            bar.n = p["step"]
            bar.set_postfix(p["postfix"], refresh=False)
            bar.refresh()
            if p["step"] >= p["total"]:  # the last steps are done; evaluation may follow
                bar.close()
                finished = True
        if done:
            if bar is not None and not finished:
                bar.close()
            return ray.get(pending)

