"""One capacity run: a model trained on a bioS population for E exposures, in pieces that
checkpoint and resume, then measured (capacity_measure.py).

A run lives in its own directory under the runs root:

    <runs>/tokenizer_<vocab>.json         the corpus' BPE (shared by every run; deterministic)
    <runs>/N<people>_<model>_s<seed>/
        spec.json                         what is trained (RunSpec)
        progress.json                     steps, tokens, train seconds, commands so far
        step_XXXXXX/, latest, store/      the last checkpoint (model_worker.checkpoint) and table
        result.json                       written once the run is done and measured

`advance(spec, run_dir, deadline)` trains from the last checkpoint until the stream is
done or the deadline nears, checkpoints, and measures once the run is done. Every
model of one (people, seed) sees the same token stream (the stream is a pure
function of the population, the seed and the exposure).

The knowledge model's table has n_sub^2 rows with n_sub = ceil(sqrt(rows_per_person *
people)) rounded up to a multiple of 16: the rows grow with the population. Its row
optimizer is the store's `table_optimizer` (the scale issue's row-wise Adam by default;
`resolve_table_optimizer`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model_worker.checkpoint import latest_checkpoint, load_weights, read_meta, save_checkpoint
from model_worker.config import ModelConfig, preset
from model_worker.data.bios.batches import BioStream
from model_worker.data.bios.pieces import BioTokenizer, Pieces, tokenize_pieces, tokenizer_meta
from model_worker.data.bios.tokenizer import train_tokenizer
from model_worker.data.bios.population import Population, make_population
from model_worker.model import Transformer
from model_worker.train import TrainConfig, make_optimizer, table_config
from store_service import optimizer as store_optimizer
from store_service import persistence
from store_service.table import Table

LARGE_TABLE_OPTIMIZER = "rowwise_adam"   # the scale issue's (20) row-wise Adam: one second moment per row
REMOTE_SHARDS = 2


@dataclass(frozen=True)
class RunSpec:
    model: str                   # the run's name in results: dense, moe, knowledge, knowledge_dense
    preset: str                  # model_worker.config preset
    people: int
    seed: int                    # the population, the stream's renderings and the initialisation
    exposures: int = 100
    seq_len: int = 256
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    value_lr: float | None = None   # the table's row lr (None: the preset's)
    rows_per_person: float = 4.0
    table_optimizer: str = LARGE_TABLE_OPTIMIZER
    vocab: int = 2048
    moe_grouped_bf16: bool = False  # the MoE's routed experts as bf16 grouped GEMMs (ModelConfig.moe_grouped_bf16)
    remote: bool = False            # the table served by REMOTE_SHARDS shard processes over gRPC
    device: str = "cpu"
    threads: int = 1

    @property
    def name(self) -> str:
        return f"N{self.people}_{self.model}_s{self.seed}" + ("_remote" if self.remote else "")

    def training_settings(self) -> dict:
        """What must match for two runs' results to stand side by side (not where they ran)."""
        d = dataclasses.asdict(self)
        for k in ("device", "threads", "remote"):
            d.pop(k)
        return d


def n_sub_for(spec: RunSpec) -> int:
    return 16 * math.ceil(math.sqrt(spec.rows_per_person * spec.people) / 16)


def resolve_table_optimizer(kind: str) -> str:
    """`kind`, checked against the store's row optimizers. (It used to fall back to dense row
    Adam while the scale issue's row-wise kinds were not on main; they are, and a silent
    fallback would now only hide a typo.)"""
    if kind not in store_optimizer.OPTIMIZER_KINDS:
        raise SystemExit(f"--table-optimizer {kind!r}: the store knows {sorted(store_optimizer.OPTIMIZER_KINDS)}")
    return kind


def model_config(spec: RunSpec, vocab_size: int) -> ModelConfig:
    # block_size bounds the rotary table only: long enough for any scored biography too
    kw: dict = {"vocab_size": vocab_size, "block_size": max(spec.seq_len, 512)}
    base = preset(spec.preset)
    if spec.moe_grouped_bf16 and base.ffn == "moe":
        kw["moe_grouped_bf16"] = True
    if base.knowledge is not None:
        kw["knowledge"] = {**dataclasses.asdict(base.knowledge), "n_sub": n_sub_for(spec)}
        if spec.remote:
            # Served from other processes, the rows come to the trainer (fetch) rather than the
            # shards' partial sums (pushdown): the same weighted sum, but over CUDA IPC a fetch
            # moves 24.9 GB/s and a readout 2.05 GB/s (wire_bench.json, H100, 242b625); the
            # pushdown twin ran at 0.24x of in process (149.5k vs 616k tokens/s, bcea650).
            kw["knowledge"]["readout"] = "fetch"
    return preset(spec.preset, **kw)


def train_config(spec: RunSpec, run_dir: Path) -> TrainConfig:
    """The project TrainConfig that carries the table settings (train.table_config)."""
    return TrainConfig(model=spec.preset, seq_len=spec.seq_len, batch_size=spec.batch_size, lr=spec.lr,
                       weight_decay=spec.weight_decay, table_optimizer=resolve_table_optimizer(spec.table_optimizer),
                       value_lr=spec.value_lr, seed=spec.seed, device=spec.device, out_dir=str(run_dir),
                       num_shards=REMOTE_SHARDS if spec.remote else 1)


def corpus_tokenizer(runs_root: Path, vocab: int) -> BioTokenizer:
    """The shared tokenizer of a runs root: trained once (deterministic), then loaded."""
    path = runs_root / f"tokenizer_{vocab}.json"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        runs_root.mkdir(parents=True, exist_ok=True)
        train_tokenizer(vocab).save(tmp)
        os.replace(tmp, path)
    return BioTokenizer.load(path)


@dataclass
class RunData:
    tokenizer: BioTokenizer
    pieces: Pieces
    population: Population


def run_data(spec: RunSpec, runs_root: Path) -> RunData:
    tok = corpus_tokenizer(runs_root, spec.vocab)
    return RunData(tok, tokenize_pieces(tok), make_population(spec.people, spec.seed))


def lr_at(spec: RunSpec, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay over the run's progress to min_lr_ratio."""
    warm = min(1.0, (step + 1) / spec.warmup_steps)
    return spec.lr * warm * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def open_table(spec: RunSpec, mcfg: ModelConfig, run_dir: Path, version: int | None):
    """The run's table: fresh (version None) or a checkpoint's version; in process, or
    served by REMOTE_SHARDS shard processes over gRPC (spec.remote)."""
    from store_service import datapath
    from store_service.client import connect
    from store_service.serve import start_shard_process
    from store_service.testing import loopback_table

    store_root = str(run_dir / "store")
    tcfg = table_config(mcfg, train_config(spec, run_dir))
    if not spec.remote:
        table = Table.create(tcfg, store_root) if version is None else Table.open(store_root, version, device=spec.device)
        try:
            yield table
        finally:
            table.close()
        return
    # The shard processes keep their rows where the trainer runs (the GPU, or host memory) and
    # move rows, gradients and readouts over the same-host bulk path (CUDA IPC, shared memory),
    # as wire_bench's training phase does; gRPC carries the control calls. Without data paths
    # every readout and its gradients went through protobuf on loopback: ~30x slower than in
    # process on the H100 (242b625, N = 30k: 25k against 786k tokens/s).
    data_paths = datapath.available_kinds()
    if version is None:
        with loopback_table(tcfg, store_root, server_device=spec.device, data_paths=data_paths,
                            connect_kw={"device": spec.device}) as table:
            yield table
        return
    token, procs, table = secrets.token_hex(8), [], None
    try:
        extra = ["--torch-threads", "1", "--device", spec.device]
        if data_paths:
            extra += ["--data-paths", ",".join(data_paths)]
        procs = [start_shard_process(store_root, version, i, admin_token=token, extra_args=extra)
                 for i in range(REMOTE_SHARDS)]
        table = connect([p.address for p in procs], admin_token=token, store_root=store_root,
                        data_paths=data_paths, device=spec.device)
        yield table
    finally:
        if table is not None:
            table.close()
        for p in procs:
            p.stop()


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _prune(run_dir: Path, keep: Path, keep_version: int | None) -> None:
    """Only the latest checkpoint and its table version stay on disk."""
    for d in run_dir.glob("step_*"):
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)
    store = str(run_dir / "store")
    if keep_version is not None and os.path.isdir(store):
        for v in persistence.list_versions(store):
            if v != keep_version:
                shutil.rmtree(persistence.version_path(store, v), ignore_errors=True)


def train_step(model: Transformer, optimizer, table, batch, lr: float, step: int) -> float:
    """One step: forward, backward (row gradients go to the store), clip, optimizer,
    balancing biases, the store's step barrier. Returns the loss (waits for the step)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    _, loss = model(batch.inputs, batch.targets)
    (loss + model.aux_loss()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.end_step()
    if table is not None:
        table.end_step(step)
    return loss.item()


def throughput(spec: RunSpec, work_dir: Path, steps: int, warm: int = 10, log=print) -> dict:
    """Training tokens/s of `spec`'s model alone: a fresh model on the run's stream, timed over
    `steps` steps after `warm` (kernel compilation, allocator, the shard processes' start).
    tokens_per_s is the timed tokens over the timed seconds; each step is timed too (a step
    ends reading its loss, so it has finished on the device), for the spread: the median
    step's tokens/s and the quartiles of the steps'."""
    if spec.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    data = run_data(spec, work_dir.parent)
    mcfg = model_config(spec, data.tokenizer.vocab_size)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    # As many exposures as the timed steps need (a small population runs out of one quickly).
    stream = BioStream(data.population, data.pieces, seed=spec.seed, exposures=1 << 20,
                       seq_len=spec.seq_len, batch_size=spec.batch_size)
    tables = open_table(spec, mcfg, work_dir, None) if mcfg.knowledge else contextlib.nullcontext()
    with tables as table:
        model = Transformer(mcfg, table).to(spec.device)
        optimizer = make_optimizer(model, train_config(spec, work_dir))
        losses, t0, tokens0, per_step = [], None, 0, []
        for step in range(warm + steps):
            if step == warm:
                t0, tokens0 = time.perf_counter(), stream.tokens_seen
            t, seen = time.perf_counter(), stream.tokens_seen
            losses.append(train_step(model, optimizer, table, stream.batch().to(spec.device),
                                     lr_at(spec, step, stream.progress), step))
            if step >= warm:
                per_step.append((stream.tokens_seen - seen) / (time.perf_counter() - t))
        elapsed = time.perf_counter() - t0
        tokens = stream.tokens_seen - tokens0
        params = model.count_params()
        transport = sorted({getattr(s, "data_path_kind", None) or "grpc" for s in table.shards}) \
            if spec.remote and table is not None else ["in_process"]
        model.close()
    stream.close()
    q1, median, q3 = statistics.quantiles(per_step, n=4, method="inclusive") if len(per_step) > 1 else per_step * 3
    out = {"tokens_per_s": tokens / elapsed, "seconds_per_step": elapsed / steps, "timed_steps": steps,
           "step_tokens_per_s": {"median": median, "quartiles": [q1, q3], "min": min(per_step), "max": max(per_step)},
           "losses": losses, "params": params, "transport": transport}
    log(f"throughput {spec.name}: {out['tokens_per_s']:.0f} tokens/s ({', '.join(transport)})")
    return out


# Seconds kept free before the deadline for the checkpoint (and, at the end, the measure).
CHECKPOINT_RESERVE_S = 30.0
LOG_EVERY = 25


def advance(spec: RunSpec, run_dir: Path, deadline: float, *, measure_fn=None, log=print,
            stop_at: int | None = None, reserve_s: float = CHECKPOINT_RESERVE_S) -> dict:
    """Train `spec` from its last checkpoint in run_dir until done or `deadline`
    (time.time()) minus `reserve_s` (or step `stop_at`); checkpoint; when done,
    call measure_fn(model, data, spec) and write result.json. Returns progress.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "result.json").exists():
        return _read_json(run_dir / "progress.json", {})
    saved = _read_json(run_dir / "spec.json", None)
    if saved is not None and RunSpec(**saved).training_settings() != spec.training_settings():
        raise ValueError(f"{run_dir} holds a run of other settings: {saved}")
    _write_json(run_dir / "spec.json", dataclasses.asdict(spec))
    torch.manual_seed(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True      # recorded in the results' device line
        torch.backends.cudnn.allow_tf32 = True
    data = run_data(spec, run_dir.parent)
    mcfg = model_config(spec, data.tokenizer.vocab_size)
    ckpt = latest_checkpoint(run_dir)
    meta = read_meta(ckpt) if ckpt is not None else None
    progress = _read_json(run_dir / "progress.json", {"step": 0, "train_s": 0.0, "timed_tokens": 0,
                                                        "timed_s": 0.0, "commands": 0, "losses": []})
    stream = BioStream(data.population, data.pieces, seed=spec.seed, exposures=spec.exposures,
                       seq_len=spec.seq_len, batch_size=spec.batch_size)
    tables = open_table(spec, mcfg, run_dir, meta and meta.get("table_version")) if mcfg.knowledge \
        else contextlib.nullcontext()
    with tables as table:
        model = Transformer(mcfg, table).to(spec.device)
        optimizer = make_optimizer(model, train_config(spec, run_dir))
        if ckpt is not None:
            load_weights(model, ckpt / "model.safetensors", device=spec.device)
            state = torch.load(ckpt / "train_state.pt", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            stream.load_state_dict(state["loader"])
            if mcfg.knowledge:
                model.refresh_table_state()
        step = progress["step"]
        t_cmd = time.time()
        model.train()
        warm = 5      # steps of each command not timed for tokens/s (allocator, kernels, prefetch)
        timed_from = None
        while not stream.done and time.time() < deadline - reserve_s and step != stop_at:
            t0 = time.perf_counter()
            p = stream.progress
            loss_value = train_step(model, optimizer, table, stream.batch().to(spec.device), lr_at(spec, step, p), step)
            dt = time.perf_counter() - t0
            progress["train_s"] += dt
            if step % LOG_EVERY == 0:
                progress["losses"].append([step, round(p, 5), loss_value])
            step += 1
            if step - progress["step"] == warm:
                timed_from = (step, stream.tokens_seen)
            elif timed_from is not None:
                progress["timed_s"] += dt
        if timed_from is not None:
            progress["timed_tokens"] += stream.tokens_seen - timed_from[1]
        progress.update(step=step, tokens=stream.tokens_seen, exposure=stream.exposure, commands=progress["commands"] + 1,
                        done=stream.done, params=model.count_params())
        progress["command_s"] = progress.get("command_s", []) + [round(time.time() - t_cmd, 1)]
        stream.close()
        meta_out = {"model_config": mcfg.to_dict(), "spec": dataclasses.asdict(spec),
                    "tokenizer": tokenizer_meta(data.tokenizer),
                    "store_root": str(run_dir / "store") if table is not None else None}
        if step > (read_meta(ckpt)["step"] if ckpt is not None else 0):
            new = save_checkpoint(run_dir, step, model, optimizer, stream.state_dict(), table, meta_out)
            _prune(run_dir, new, read_meta(new).get("table_version"))
        _write_json(run_dir / "progress.json", progress)
        log(f"{spec.name}: step {step} exposure {stream.exposure}/{spec.exposures} loss {progress['losses'][-1][2]:.3f} "
            f"({'done' if stream.done else 'to be continued'})")
        if stream.done and measure_fn is not None:
            model.eval()
            result = measure_fn(model, data, spec)
            _write_json(run_dir / "result.json", {"spec": dataclasses.asdict(spec), "progress": progress,
                                                  "tokenizer": tokenizer_meta(data.tokenizer), **result})
        model.close()
    return progress
