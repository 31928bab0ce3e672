"""wire_bench's `train` phase: training throughput of a preset (d1024 by default) with its table
in process vs in shard server processes on the same host, in fetch mode.

The table is created and published once; every run starts from that version (the in-process
run opens it, the remote run's servers load it), so all runs start equal. The runs go in
pairs, in-process and remote, alternating which goes first, one at a time (never two tables on
the card at once). tokens/s of a run is timed over --train-steps after --train-warm-steps
(kernel compilation and allocator warm-up, in the worker and each fresh server process); the
headline ratio is the median over the pairs of remote / in-process.

Losses: the spread of the in-process runs among themselves (GPU summation order varies from
run to run) is what the remote runs are held to: `losses_exact` says whether every remote run's
losses are within that spread of its pair's in-process run.

The training loop is benchmarks/quality.py's throughput run's (model_worker.train.train with
a step hook), with the table made here so that its rows can be bfloat16.
"""
from __future__ import annotations

import itertools
import secrets
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from model_worker.data import ByteTokenizer
from model_worker.train import TrainConfig, model_config, table_config, train
from store_service import datapath
from store_service.client import connect
from store_service.grpc_datapath import WireConfig
from store_service.optimizer import OptimizerConfig
from store_service.serve import start_shard_process
from store_service.table import Table


def default_table_optimizer() -> str:
    """The large-table optimizer (issue 20's "rowwise_adam") where it exists, else SGD: the
    only older kind with no per-element state (Adam's would be 8 bytes a value)."""
    for kind in ("rowwise_adam", "sgd"):
        try:
            OptimizerConfig(kind=kind)
            return kind
        except Exception:
            continue
    return "sgd"


def add_arguments(ap) -> None:
    ap.add_argument("--train-preset", default="d1024")
    ap.add_argument("--train-corpus", default="medium-para")
    ap.add_argument("--train-batch-size", type=int, default=64)
    ap.add_argument("--train-seq-len", type=int, default=256, help="with batch 64: 16,384 tokens a step")
    ap.add_argument("--train-steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--train-warm-steps", type=int, default=5)
    ap.add_argument("--train-pairs", type=int, default=3)
    ap.add_argument("--train-shards", type=int, default=2)
    ap.add_argument("--train-optimizer", default=None, help="the table's row optimizer (default: the large-table "
                                                            "one where it exists: rowwise_adam, else sgd)")
    ap.add_argument("--train-data-paths", default=None,
                    help="transports the remote runs ask for, preferred first (default: cuda_ipc,shm where "
                         "available; '' for gRPC only)")


def _config(args, out_dir: str) -> TrainConfig:
    return TrainConfig(model=args.train_preset, corpus=args.train_corpus, seq_len=args.train_seq_len,
                       batch_size=args.train_batch_size, steps=args.train_warm_steps + args.train_steps,
                       eval_every=0, eval_recall_n=0, eval_loss_batches=0, num_shards=args.train_shards,
                       table_optimizer=args.train_optimizer or default_table_optimizer(), out_dir=out_dir,
                       progress=False, seed=0, device=args.device, warmup=2)


def _run(args, cfg: TrainConfig, root: str, version: int, remote: bool, data_paths: tuple[str, ...]) -> dict:
    marks: list[float] = []
    procs, table = [], None
    try:
        if remote:
            token = secrets.token_hex(8)
            extra = ["--device", args.device, "--torch-threads", str(args.server_threads)]
            if data_paths:
                extra += ["--data-paths", ",".join(data_paths)]
            procs = [start_shard_process(root, version, i, admin_token=token, extra_args=extra,
                                         startup_timeout_s=300) for i in range(cfg.num_shards)]
            table = connect([p.address for p in procs], admin_token=token, store_root=root, timeout_s=300,
                            data_paths=data_paths, device=args.device, wire_config=WireConfig(channels=args.channels))
        else:
            table = Table.open(root, version, device=args.device)
        r = train(cfg, table=table, step_hook=lambda done: marks.append(time.perf_counter()))
        used = sorted({getattr(s, "data_path_kind", "in_process") for s in table.shards})
    finally:
        if table is not None:
            if remote:
                for s in table.shards:
                    s.close()
            table.close()
        for p in procs:
            p.stop()
        del table
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    steady = (marks[-1] - marks[args.train_warm_steps - 1]) / args.train_steps
    return {"tokens_per_s": cfg.batch_size * cfg.seq_len / steady, "seconds_per_step": steady,
            "final_loss": r["final_loss"], "losses": r["losses"], "transport": used}


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def train_phase(args) -> dict:
    if args.train_warm_steps < 1 or args.train_steps < 1 or args.train_pairs < 1:
        raise SystemExit("--train-warm-steps, --train-steps and --train-pairs must be >= 1")
    data_paths = datapath.available_kinds() if args.train_data_paths is None else \
        datapath.available_kinds([k for k in args.train_data_paths.split(",") if k])
    with tempfile.TemporaryDirectory() as work:
        cfg = _config(args, work)
        mcfg = model_config(cfg, ByteTokenizer().vocab_size)
        tcfg = replace(table_config(mcfg, cfg), value_dtype="bfloat16")
        t0 = time.perf_counter()
        # Made in host memory and published: every run loads that version where it runs.
        table = Table.create(replace(tcfg, device="cpu"), f"{work}/store")
        version = table.snapshot()
        table.close()
        del table
        created_s = time.perf_counter() - t0
        pairs = []
        for i in range(args.train_pairs):
            order = ("local", "remote") if i % 2 == 0 else ("remote", "local")
            pair = {name: _run(args, cfg, f"{work}/store", version, name == "remote", data_paths) for name in order}
            pair["remote_over_local"] = pair["remote"]["tokens_per_s"] / pair["local"]["tokens_per_s"]
            print(f"train pair {i}: local {pair['local']['tokens_per_s']:.0f} tok/s, remote "
                  f"{pair['remote']['tokens_per_s']:.0f} tok/s ({pair['remote']['transport']})", flush=True)
            pairs.append(pair)
    local_spread = max((_max_rel_diff(a["local"]["losses"], b["local"]["losses"])
                        for a, b in itertools.combinations(pairs, 2)), default=None)
    remote_diff = max(_max_rel_diff(p["remote"]["losses"], p["local"]["losses"]) for p in pairs)
    kn = mcfg.knowledge
    return {
        "preset": args.train_preset,
        "model": {"d_model": mcfg.d_model, "n_layers": mcfg.n_layers, "n_heads": mcfg.n_heads, "ffn": mcfg.ffn,
                  "n_experts": mcfg.n_experts, "n_active": mcfg.n_active, "n_shared": mcfg.n_shared,
                  "knowledge_layers": list(kn.layers), "knowledge_heads": kn.n_heads, "k": kn.k, "d_k": kn.d_k,
                  "d_v": kn.d_v, "readout": kn.readout},
        "table": {"rows": tcfg.num_rows if hasattr(tcfg, "num_rows") else kn.n_sub ** 2, "value_dtype": "bfloat16",
                  "shards": cfg.num_shards, "optimizer": cfg.table_optimizer, "create_and_publish_s": created_s},
        "tokens_per_step": cfg.batch_size * cfg.seq_len, "timed_steps": args.train_steps,
        "warm_steps": args.train_warm_steps, "data_paths_asked": list(data_paths),
        "pairs": [{"local_tokens_per_s": p["local"]["tokens_per_s"], "remote_tokens_per_s": p["remote"]["tokens_per_s"],
                   "remote_over_local": p["remote_over_local"], "remote_transport": p["remote"]["transport"],
                   "local_final_loss": p["local"]["final_loss"], "remote_final_loss": p["remote"]["final_loss"]}
                  for p in pairs],
        "remote_over_local": statistics.median(p["remote_over_local"] for p in pairs),
        "remote_over_local_min": min(p["remote_over_local"] for p in pairs),
        "remote_over_local_max": max(p["remote_over_local"] for p in pairs),
        "loss_max_rel_diff_remote_vs_local": remote_diff,
        "loss_max_rel_diff_between_local_runs": local_spread,
        "losses_exact": None if local_spread is None else remote_diff <= local_spread,
    }
