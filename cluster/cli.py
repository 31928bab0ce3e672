"""`kstore`: the command line of the knowledge store.

    kstore demo                      the main job: an embedded cluster, end to end, then down
    kstore up [--config c.toml]      start a standing Ray cluster with the store's shard actors
    kstore status                    shards, rows, version, usage, health
    kstore train --steps 300         train a model (against the standing cluster's store if one is up)
    kstore generate --checkpoint runs/x/step_000300 "The capital of France is"
    kstore admin snapshot|swap|add-rows|freeze|unfreeze|ablate|restore|stats
    kstore scale 4                   re-partition the store onto 4 shard actors
    kstore down                      stop the actors and the Ray head `up` started

A standing cluster's settings are kept in .kstore/cluster.json (--state) so
that later commands find it. `train` and `generate` take the flags of
`python -m model_worker.train` / `.generate` (one definition, in those modules)
and run in this process when no cluster is up (or with --local).
Errors: one line on stderr and exit code 2; -v adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from .cli_args import CliError, parse_ids, step_shards
from .cli_knowledge import register as register_knowledge_verbs
from .config import ClusterConfig

log = logging.getLogger("kstore")

STATE = ".kstore/cluster.json"


# -- helpers -------------------------------------------------------------------------

def _state_path(args) -> Path:
    return Path(args.state)


def _read_state(args) -> tuple[ClusterConfig, dict | None] | None:
    """(config, the Ray head `up` started or None) of the recorded cluster, or None."""
    p = _state_path(args)
    if not p.exists():
        return None
    raw = json.loads(p.read_text())
    return ClusterConfig.from_dict(raw["cluster"]).ensure_tokens(), raw.get("ray_head")


def _load_state(args) -> ClusterConfig:
    state = _read_state(args)
    if state is None:
        raise CliError(f"no running cluster recorded at {_state_path(args)}; start one with `kstore up`")
    return state[0]


def _attach(args):
    from .launch import attach
    cfg = _load_state(args)
    try:
        return attach(cfg)
    except Exception as e:  # noqa: BLE001 - turned into a message for the user
        raise CliError(f"cannot reach the cluster recorded at {_state_path(args)} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); `kstore down` clears the record, "
                       "`kstore up` starts a new one") from e


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table_config_for(model: str, corpus: str, seq_len: int = 128):
    from model_worker.config import configs
    from model_worker.data.corpus_config import CORPUS_PRESETS
    from model_worker.train import TrainConfig, model_config, table_config
    if model not in configs:
        raise CliError(f"unknown model preset {model!r} in the cluster config; known: {', '.join(sorted(configs))}")
    if corpus not in CORPUS_PRESETS:
        raise CliError(f"unknown corpus preset {corpus!r} in the cluster config; "
                       f"known: {', '.join(sorted(CORPUS_PRESETS))}")
    tc = TrainConfig(model=model, corpus=corpus, seq_len=seq_len)
    mcfg = model_config(tc, 260)
    if mcfg.knowledge is None:
        raise CliError(f"model preset {model!r} has no knowledge layer, so no store to serve; "
                       "pick a *-knowledge preset")
    return table_config(mcfg, tc)


# -- commands ------------------------------------------------------------------------

def cmd_up(args) -> None:
    import ray

    from .launch import StoreCluster, attach
    from .ray_head import RayHead, start_head
    p = _state_path(args)
    state = _read_state(args)
    if state is not None:
        try:
            attach(state[0])
            up = True
        except Exception:  # noqa: BLE001 - a record of a cluster that is gone
            up = False
        finally:
            ray.shutdown()
        if up:
            raise CliError(f"a cluster is already up (recorded at {p}); `kstore status` shows it, "
                           "`kstore down` stops it")
        if state[1]:
            RayHead.from_dict(state[1]).stop()
        p.unlink()
        print(f"removed the record of a cluster that is no longer running ({p})")
    cfg = ClusterConfig.load(args.config)
    cfg = replace(cfg, store_root=os.path.abspath(cfg.store_root))
    tcfg = _table_config_for(cfg.model_preset, cfg.corpus_preset)   # a bad preset fails before anything starts
    head = None
    try:
        if not cfg.ray_address:
            head = start_head(args.num_cpus, p.parent / "ray_head.log")
            print(f"started a Ray head at {head.address} (pid {head.pid})", flush=True)
            cfg = replace(cfg, ray_address=head.address)
        cluster = StoreCluster.start(cfg, tcfg)   # stops what it started if it fails
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"cluster": cfg.to_dict(), "ray_head": head and head.to_dict()}, indent=2))
        _print(cluster.status())
    except BaseException:
        ray.shutdown()
        if head is not None:
            head.stop()        # a failed `up` leaves nothing running
        raise
    where = (f"; its tokens (read, train, admin) in {cfg.token_path()} (mode 0600)"
             if os.path.exists(cfg.token_path()) else "")
    print(f"cluster up; its settings are in {p}{where}")


def cmd_status(args) -> None:
    _print(_attach(args).status())


def cmd_down(args) -> None:
    import ray

    from .ray_head import RayHead
    state = _read_state(args)
    if state is None:
        raise CliError(f"no running cluster recorded at {_state_path(args)}; nothing to stop")
    try:
        _attach(args).stop()
    except CliError as e:
        print(f"kstore: {e}", file=sys.stderr)   # unreachable: still stop its head and clear the record
    finally:
        ray.shutdown()
        if state[1]:
            RayHead.from_dict(state[1]).stop()
        _state_path(args).unlink(missing_ok=True)
    print("cluster down")


def cmd_scale(args) -> None:
    cluster = _attach(args)
    version = cluster.scale(args.shards)
    print(f"store re-partitioned onto {args.shards} shards as version {version}")
    _print(cluster.status())


def _use_cluster(args, verb: str) -> bool:
    """Whether `train` / `generate` go through the standing cluster (one is recorded and
    --local was not given); says which, on stderr."""
    if args.local or _read_state(args) is None:
        if getattr(args, "scale_at", None):
            raise CliError("--scale-at re-partitions a standing cluster's store; start one with `kstore up`")
        print(f"kstore {verb}: in this process (no standing cluster{' used' if args.local else ' is up'})",
              file=sys.stderr)
        return False
    print(f"kstore {verb}: against the standing cluster recorded at {_state_path(args)} "
          "(--local: in this process)", file=sys.stderr)
    return True


def cmd_train(args) -> None:
    from model_worker import train as train_module
    if not _use_cluster(args, "train"):
        train_module.run(args)
        return
    from dataclasses import asdict

    from model_worker.cli_flags import train_config_from_args

    from .worker_actor import WorkerActor, follow_training
    cluster = _attach(args)
    cfg = cluster.config
    tcfg, resume = train_config_from_args(args)
    if (tcfg.model, tcfg.corpus) != (cfg.model_preset, cfg.corpus_preset):
        raise CliError(f"the cluster's store was made for --model {cfg.model_preset} --corpus "
                       f"{cfg.corpus_preset}; pass those (or --local to train in this process)")
    tcfg = replace(tcfg, out_dir=os.path.abspath(tcfg.out_dir))
    worker = WorkerActor.options(**cfg.worker.ray_options()).remote(cfg.admin_token)
    scale_at = dict(args.scale_at or [])
    summary = follow_training(worker, worker.train.remote(asdict(tcfg), cfg.to_dict(), resume=resume,
                                                          scale_at=scale_at))
    _print({k: summary[k] for k in ("final_loss", "tokens_per_s", "evals", "recoveries")})


def cmd_generate(args) -> None:
    from model_worker import generate as generate_module
    if not _use_cluster(args, "generate"):
        generate_module.run(args)
        return
    cluster = _attach(args)
    table = cluster.table()       # the serving rows: swaps, ablations and scaling show in the answers
    try:
        generate_module.run(args, table=table)
    finally:
        table.close()


def cmd_admin(args) -> None:
    import torch

    from store_service.usage import usage_summary
    cluster = _attach(args)
    table = cluster.table()
    try:
        if args.verb == "snapshot":
            print(f"published version {table.snapshot()}")
        elif args.verb == "swap":
            serving = cluster.swap(args.version, args.shard)
            if args.shard is not None:
                how = f" (shard {args.shard} from version {args.version}, the others as they were served)"
            elif serving != args.version:
                how = f" (version {args.version} re-partitioned onto the {len(cluster.shard_map().entries)} " \
                      "serving shards)"
            else:
                how = ""
            print(f"serving version {serving}{how}")
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
    run_demo(steps=args.steps, store_root=args.store_root, num_shards=args.shards)


# -- the parser ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from model_worker.cli_flags import add_generate_arguments, add_train_arguments
    p = argparse.ArgumentParser(
        prog="kstore", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A language model whose knowledge lives in a distributed key/value store.",
        epilog="Start with `kstore demo` (everything on an embedded cluster), or `kstore up`, "
               "`kstore train`, `kstore generate`, `kstore down` for a standing one.")
    p.add_argument("--state", default=STATE, help=f"where a standing cluster's settings live (default {STATE})")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO; errors with their traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: train, answer, find a fact's rows, ablate them, hot-swap, "
                                    "learn new facts, on an embedded cluster")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's, cluster/demo.py)")
    d.add_argument("--store-root", default="runs/demo", help="where store versions, checkpoints and "
                                                            "summary.json go (default runs/demo)")
    d.add_argument("--shards", type=int, default=2, help="store shard actors (default 2)")
    d.set_defaults(fn=cmd_demo)

    u = sub.add_parser("up", help="start a standing Ray cluster and the store's shard actors")
    u.add_argument("--config", default=None, help="a TOML or JSON ClusterConfig (cluster/config.py); "
                                                   "default: 2 shards, the tiny-knowledge model's table")
    u.add_argument("--num-cpus", type=int, default=4, help="CPUs the Ray head offers (default 4)")
    u.set_defaults(fn=cmd_up)

    sub.add_parser("status", help="shards, rows, versions, usage, health").set_defaults(fn=cmd_status)
    sub.add_parser("down", help="stop the shard actors and the Ray head `up` started").set_defaults(fn=cmd_down)

    s = sub.add_parser("scale", help="re-partition the store onto S shard actors, while serving")
    s.add_argument("shards", type=int)
    s.set_defaults(fn=cmd_scale)

    t = sub.add_parser("train", help="train a model: in a worker actor against the standing cluster's store "
                                     "if one is up, else in this process (the flags of python -m "
                                     "model_worker.train)")
    add_train_arguments(t)
    t.add_argument("--scale-at", type=step_shards, action="append", metavar="STEP:SHARDS",
                   help="standing cluster only: re-partition the store onto SHARDS shards after STEP (repeatable)")
    t.add_argument("--local", action="store_true", help="train in this process even if a cluster is up")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="answer questions from a checkpoint, reading the standing cluster's "
                                        "serving rows if one is up (the flags of python -m model_worker.generate)")
    add_generate_arguments(g)
    g.add_argument("--local", action="store_true", help="read the checkpoint's own store version, in this "
                                                        "process, even if a cluster is up")
    g.set_defaults(fn=cmd_generate)

    a = sub.add_parser("admin", help="control plane: snapshot, swap, add rows, freeze, ablate, stats")
    av = a.add_subparsers(dest="verb", required=True, metavar="VERB")
    av.add_parser("snapshot", help="publish the serving state as a new version")
    sw = av.add_parser("swap", help="hot-swap to a published version (the whole table, re-partitioned onto the "
                                    "serving shards if it has another number; or --shard i)")
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: reported in one line, exit code 2. Anything else
    is a bug and keeps its traceback."""
    from store_service.errors import StoreError
    return (CliError, StoreError, OSError, ValueError, KeyError)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.fn(args)
    except _user_errors() as e:
        if args.verbose:
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        hint = "" if isinstance(e, CliError) or args.verbose else " (kstore -v ... shows the traceback)"
        print(f"kstore: {msg}{hint}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
