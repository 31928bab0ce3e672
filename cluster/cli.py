"""`kstore`: the command line of the knowledge store.

    kstore demo                      the main job: an embedded cluster, end to end, then down
    kstore up [--config c.toml]      start a standing Ray cluster with the store's shard actors
    kstore status                    shards, rows, version, usage, health
    kstore train --steps 300         train a model against the store (a worker actor)
    kstore generate --checkpoint runs/x/step_000300 "The capital of France is"
    kstore admin snapshot|swap|add-rows|freeze|unfreeze|ablate|restore|stats
    kstore scale 4                   re-partition the store onto 4 shard actors
    kstore down                      stop the actors and the Ray cluster

A standing cluster's settings are kept in .kstore/cluster.json (--state) so
that later commands find it. Every command has --help.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from .cli_args import parse_ids, step_shards
from .cli_knowledge import register as register_knowledge_verbs
from .config import ClusterConfig

log = logging.getLogger("kstore")

STATE = ".kstore/cluster.json"


# -- helpers -------------------------------------------------------------------------

def _state_path(args) -> Path:
    return Path(args.state)


def _load_state(args) -> ClusterConfig:
    p = _state_path(args)
    if not p.exists():
        sys.exit(f"kstore: no running cluster recorded at {p}; start one with `kstore up`")
    return ClusterConfig.from_dict(json.loads(p.read_text())).ensure_tokens()


def _attach(args):
    from .launch import attach
    cfg = _load_state(args)
    try:
        return attach(cfg)
    except Exception as e:  # noqa: BLE001 - turned into a message for the user
        sys.exit(f"kstore: cannot reach the cluster recorded at {_state_path(args)} ({e}); "
                 "is it up? (`kstore status`, or `kstore up` to start one)")


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table_config_for(model: str, corpus: str, seq_len: int = 128):
    from model_worker.train import TrainConfig, model_config, table_config
    tc = TrainConfig(model=model, corpus=corpus, seq_len=seq_len)
    return table_config(model_config(tc, 260), tc)


# -- commands ------------------------------------------------------------------------

def cmd_up(args) -> None:
    cfg = ClusterConfig.load(args.config)
    cfg = replace(cfg, store_root=os.path.abspath(cfg.store_root))
    if not cfg.ray_address:
        cmd = ["ray", "start", "--head", "--disable-usage-stats", f"--num-cpus={args.num_cpus}",
               "--include-dashboard=false"]
        print("starting a Ray head:", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        cfg = replace(cfg, ray_address="auto")
    from .launch import StoreCluster
    cluster = StoreCluster.start(cfg, _table_config_for(cfg.model_preset, cfg.corpus_preset))
    p = _state_path(args)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cfg.to_dict(), indent=2))
    _print(cluster.status())
    where = (f"; its tokens (read, train, admin) in {cfg.token_path()} (mode 0600)"
             if os.path.exists(cfg.token_path()) else "")
    print(f"cluster up; its settings are in {p}{where}")


def cmd_status(args) -> None:
    _print(_attach(args).status())


def cmd_down(args) -> None:
    _load_state(args)  # exits with a message when no cluster is recorded
    try:
        _attach(args).stop()
    finally:
        subprocess.run(["ray", "stop"], check=False, stdout=subprocess.DEVNULL)
        _state_path(args).unlink(missing_ok=True)
    print("cluster down")


def cmd_scale(args) -> None:
    cluster = _attach(args)
    version = cluster.scale(args.shards)
    print(f"store re-partitioned onto {args.shards} shards as version {version}")
    _print(cluster.status())


def cmd_train(args) -> None:
    from .worker_actor import WorkerActor, follow_training
    cluster = _attach(args)
    cfg = cluster.config
    train_cfg = {"model": cfg.model_preset, "corpus": cfg.corpus_preset, "steps": args.steps,
                 "seq_len": 128, "out_dir": os.path.abspath(args.out), "ckpt_every": args.ckpt_every,
                 "eval_every": args.eval_every, "seed": cfg.seed}
    worker = WorkerActor.options(**cfg.worker.ray_options()).remote(cfg.admin_token)
    scale_at = dict(args.scale_at or [])
    summary = follow_training(worker, worker.train.remote(train_cfg, cfg.to_dict(), scale_at=scale_at))
    _print({k: summary[k] for k in ("final_loss", "tokens_per_s", "evals", "recoveries")})


def cmd_generate(args) -> None:
    import ray

    from .worker_actor import WorkerActor
    cluster = _attach(args)
    worker = WorkerActor.options(**cluster.config.worker.ray_options()).remote(cluster.config.admin_token)
    ray.get(worker.load.remote(os.path.abspath(args.checkpoint)))
    answers = ray.get(worker.answer.remote(args.questions, args.max_new_tokens))
    for q, a in zip(args.questions, answers):
        print(f"{q} ->{a}")
        if args.show_rows:
            for layer, rows in ray.get(worker.rows_used.remote(q)).items():
                print(f"   layer {layer}: (row, weight) {rows}")


def cmd_admin(args) -> None:
    import torch

    from store_service.usage import usage_summary
    cluster = _attach(args)
    table = cluster.table()
    try:
        if args.verb == "snapshot":
            print(f"published version {table.snapshot()}")
        elif args.verb == "swap":
            print(f"serving version {cluster.swap(args.version, args.shard)}")
        elif args.verb == "add-rows":
            info = table.info()
            g = torch.Generator().manual_seed(args.seed)
            keys = torch.nn.functional.normalize(torch.randn(args.count, info.d_k, generator=g), dim=-1)
            values = torch.randn(args.count, info.d_v, generator=g) * args.value_std
            ids = table.add_rows(values, keys)
            print(f"added rows {int(ids[0])}..{int(ids[-1])}")
        elif args.verb in ("freeze", "unfreeze"):
            table.set_frozen(args.ids, args.verb == "freeze")
            print(f"{args.verb}: {args.ids.numel()} rows")
        elif args.verb in ("ablate", "restore"):
            table.set_ablated(args.ids, args.verb == "ablate")
            print(f"{args.verb}: {args.ids.numel()} rows")
        elif args.verb == "stats":
            _print(usage_summary(table.usage()))
    finally:
        table.close()


def cmd_demo(args) -> None:
    from .demo import run_demo
    run_demo(steps=args.steps, store_root=args.store_root, corpus=args.corpus, model=args.model,
             num_shards=args.shards)


# -- the parser ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kstore", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A language model whose knowledge lives in a distributed key/value store.",
        epilog="Start with `kstore demo` (everything on an embedded cluster), or `kstore up`, "
               "`kstore train`, `kstore generate`, `kstore down` for a standing one.")
    p.add_argument("--state", default=STATE, help=f"where a standing cluster's settings live (default {STATE})")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: train, recall, answer, explain, hot-swap, on an embedded cluster")
    d.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    d.add_argument("--store-root", default="runs/demo", help="where store versions and checkpoints go")
    d.add_argument("--corpus", default="tiny", help="corpus preset: tiny | small | full")
    d.add_argument("--model", default="small-knowledge", help="model preset (model_worker.config.configs)")
    d.add_argument("--shards", type=int, default=2, help="store shard actors (default 2)")
    d.set_defaults(fn=cmd_demo)

    u = sub.add_parser("up", help="start a standing Ray cluster and the store's shard actors")
    u.add_argument("--config", default=None, help="a TOML or JSON ClusterConfig (cluster/config.py); "
                                                   "default: 2 shards, embedded defaults")
    u.add_argument("--num-cpus", type=int, default=4, help="CPUs the Ray head offers (default 4)")
    u.set_defaults(fn=cmd_up)

    sub.add_parser("status", help="shards, rows, versions, usage, health").set_defaults(fn=cmd_status)
    sub.add_parser("down", help="stop the shard actors and the Ray cluster").set_defaults(fn=cmd_down)

    s = sub.add_parser("scale", help="re-partition the store onto S shard actors, while serving")
    s.add_argument("shards", type=int)
    s.set_defaults(fn=cmd_scale)

    t = sub.add_parser("train", help="train the cluster's model preset in a worker actor")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--out", default="runs/cluster", help="checkpoint directory")
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--scale-at", type=step_shards, action="append", metavar="STEP:SHARDS",
                   help="re-partition the store onto SHARDS shards after STEP (repeatable)")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="answer questions from a checkpoint, against the cluster's store")
    g.add_argument("--checkpoint", required=True, help="a step directory written by training")
    g.add_argument("--max-new-tokens", type=int, default=24)
    g.add_argument("--show-rows", action="store_true", help="print the rows each knowledge layer read")
    g.add_argument("questions", nargs="+")
    g.set_defaults(fn=cmd_generate)

    a = sub.add_parser("admin", help="control plane: snapshot, swap, add rows, freeze, ablate, stats")
    av = a.add_subparsers(dest="verb", required=True, metavar="VERB")
    av.add_parser("snapshot", help="publish the serving state as a new version")
    sw = av.add_parser("swap", help="hot-swap to a published version (the whole table, or --shard i)")
    sw.add_argument("--version", type=int, required=True)
    sw.add_argument("--shard", type=int, default=None)
    ar = av.add_parser("add-rows", help="append rows to the last flat segment")
    ar.add_argument("--count", type=int, required=True)
    ar.add_argument("--value-std", type=float, default=0.01)
    ar.add_argument("--seed", type=int, default=0)
    for verb, what in (("freeze", "stop updating"), ("unfreeze", "resume updating"),
                       ("ablate", "never select"), ("restore", "select again")):
        v = av.add_parser(verb, help=f"{what} rows")
        v.add_argument("--ids", type=parse_ids, required=True, help="e.g. 3,7,100:200")
    av.add_parser("stats", help="row usage: fraction used, KL from uniform, top-row share")
    a.set_defaults(fn=cmd_admin)
    register_knowledge_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.fn(args)


if __name__ == "__main__":
    main()
