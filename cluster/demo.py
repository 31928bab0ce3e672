"""The main job (`kstore demo`): the whole system, end to end, on an embedded
Ray cluster on this machine.

1. start 2 store shard actors (gRPC, Zarr-backed) and 1 worker actor;
2. train a small MoE + knowledge model on the facts corpus (progress bar);
3. report fact recall on phrasings never seen in training;
4. answer a few questions by generation, and show which rows one used;
5. edit the knowledge: ablate those rows while serving and ask again;
6. hot-swap the store back to the published snapshot and ask again;
7. stop the cluster.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import ray

from .config import ClusterConfig
from .launch import StoreCluster
from .worker_actor import WorkerActor, follow_training

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(steps: int = 600, store_root: str = "runs/demo", corpus: str = "tiny",
             model: str = "small-knowledge", num_shards: int = 2, questions: int = 4) -> dict:
    import torch

    from model_worker.data import build_corpus
    from model_worker.train import TrainConfig, model_config, table_config

    t_start = time.time()
    root = os.path.abspath(store_root)
    shutil.rmtree(root, ignore_errors=True)
    # seq_len 96 holds the longest prompt of the tiny corpus (the model's context is its seq_len).
    train_cfg = TrainConfig(model=model, corpus=corpus, steps=steps, seq_len=96, threads=1,
                            out_dir=os.path.join(root, "checkpoints"), ckpt_every=steps, eval_every=steps,
                            num_shards=num_shards)
    tcfg = table_config(model_config(train_cfg, 260), train_cfg)
    cfg = ClusterConfig(store_root=os.path.join(root, "store"), num_shards=num_shards)

    _say(f"starting an embedded Ray cluster: {num_shards} store shards, 1 worker")
    cluster = StoreCluster.start(cfg, tcfg)
    summary: dict = {}
    try:
        status = cluster.status()
        for s in status["shards"]:
            print(f"   shard {s['shard']}: rows {s['rows'][0]}..{s['rows'][1]} at {s['address']}, "
                  f"version {s['version']}")
        worker = WorkerActor.options(**cfg.worker.ray_options()).remote(cfg.admin_token)

        _say(f"training {model} on the '{corpus}' facts corpus for {steps} steps (rows update on the shards)")
        result = follow_training(worker, worker.train.remote(dataclasses.asdict(train_cfg), cfg.to_dict()))
        ev = result["evals"][-1] if result["evals"] else {}
        print(f"   final loss {result['final_loss']:.3f}, {result['tokens_per_s']:.0f} tokens/s")
        _say("fact recall on held-out phrasings (templates never seen in training)")
        print(f"   recall {ev.get('recall_heldout', float('nan')):.3f}, "
              f"held-out loss {ev.get('heldout_loss', float('nan')):.3f}")
        summary.update(final_loss=result["final_loss"], recall_heldout=ev.get("recall_heldout"))

        corp = build_corpus(corpus)
        qs = corp.eval_prompts[:questions]
        answers = corp.eval_answers[:questions]
        _say("answering questions by generation (each token retrieves rows from the store)")
        got = ray.get(worker.answer.remote(qs))
        for q, a, g in zip(qs, answers, got):
            print(f"   {q!r} -> {g.strip()!r}   (expected {a!r})")

        q = qs[0]
        _say(f"rows the first answer token of {q!r} read (the top 8 of each layer: row id, weight)")
        rows = ray.get(worker.rows_used.remote(q, 1 << 20))  # every row read, by weight
        for layer, rs in rows.items():
            print(f"   layer {layer}: {rs[:8]}")

        table = cluster.table()
        snapshot = table.snapshot()
        _say(f"published snapshot version {snapshot}; ablating every row that token read, while serving")
        used = torch.tensor(sorted({r for rs in rows.values() for r, _ in rs}), dtype=torch.int64)
        table.set_ablated(used, True)
        after = ray.get(worker.answer.remote([q]))[0]
        print(f"   {q!r} -> {after.strip()!r}   (with {used.numel()} rows ablated)")

        _say(f"hot-swapping the store back to snapshot version {snapshot}")
        t0 = time.time()
        cluster.swap(snapshot)
        restored = ray.get(worker.answer.remote([q]))[0]
        print(f"   swapped in {time.time() - t0:.2f}s; {q!r} -> {restored.strip()!r}")
        table.close()
        summary.update(answer=got[0], ablated_answer=after, restored_answer=restored, swap_version=snapshot)
    finally:
        _say("stopping the cluster")
        cluster.stop()
    print(f"   done in {time.time() - t_start:.0f}s; store versions and checkpoints are under {root}")
    return summary
