"""What a training run is asked to do (`TrainConfig`), importable without torch (the
command lines build their flags from it: cli_flags.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    model: str = "tiny-knowledge"          # a preset name (model_worker.config.configs)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    corpus: str = "tiny"                   # a corpus preset (model_worker.data.CORPUS_PRESETS)
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1              # cosine decay to lr * min_lr_ratio
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # the table (knowledge models only): row-wise sparse optimizer applied at end_step
    table_optimizer: str = "adam"          # a store optimizer kind (store_service/optimizer.py): "adam", "sgd", ...
    value_lr: float | None = None          # None -> knowledge.value_lr
    flat_rows: int = 0                     # a flat segment after the product segment
    num_shards: int = 1
    table_bias_step: float = 1e-3
    # evaluation and checkpoints (0 = never)
    eval_every: int = 100
    eval_recall_n: int = 256               # recall on the first n held-out-phrasing prompts (0 = all)
    eval_loss_batches: int = 8
    eval_batch_size: int = 64              # prompts per generation call (grouped by length inside it); on a
                                           #   GPU, where each decoded token is a launch-bound step, use ~1024
    ckpt_every: int = 0
    out_dir: str = "runs/default"
    seed: int = 0
    progress: bool = True
    threads: int = 0                       # torch intra-op threads (0 = torch's default); 1 is best on a busy small CPU
    device: str = "cpu"                    # "cuda": model, batches and the in-process table's shards on the GPU

    def __post_init__(self):
        self.model_overrides = dict(self.model_overrides)
