"""`learn`: teach a trained model + table new facts with one of the registered methods.

    from model_worker.learn import LearnConfig, learn
    result = learn(model, table, corpus.new_train, tok, LearnConfig(steps=300))
    result.version, result.new_ids, result.losses
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from store_service.interface import KnowledgeTable

from ..data import Batch, ByteTokenizer, ExampleLoader
from ..model import Transformer
from . import new_rows  # noqa: F401, I001 - registers "new_rows" (first: the default method)
from . import baselines  # noqa: F401 - registers "sparse_memory", "full_finetune", "lora"
from .config import LearnConfig, LearnResult
from .queries import answer_only
from .registry import LearnRun, method_named


def learn(model: Transformer, table: KnowledgeTable, examples: Sequence, tok: ByteTokenizer,
          cfg: LearnConfig | None = None, *, background: Sequence[Batch] | None = None,
          publish: bool = True) -> LearnResult:
    """Teach `model` + `table` the facts in `examples` (corpus Examples or TextFacts)
    with cfg.method. For "new_rows" the model and every existing row stay bitwise
    unchanged. `background`: pretraining batches (sparse_memory's document
    frequencies; new_rows' key calibration). publish: snapshot the table as a new version.
    The old rows' freeze flags are as they were afterwards; new rows are trainable
    (but for those the method keeps frozen, e.g. detectors)."""
    cfg = cfg or LearnConfig()
    method = method_named(cfg.method)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    n_old = table.info().num_rows
    was_frozen = table.usage().frozen.clone()
    run = LearnRun(model, table, examples, tok, cfg, background,
                   loader=ExampleLoader(examples, tok, min(cfg.batch_size, len(examples)), seed=cfg.seed,
                                        answer_only=answer_only(examples)),
                   lr=cfg.lr if cfg.lr is not None else method.default_lr,
                   old_ids=torch.arange(n_old, dtype=torch.int64), result=LearnResult(cfg.method, []))
    method.run(run)

    # restore the freeze flags the old rows had (new rows are trainable, but those kept frozen)
    table.set_frozen(run.old_ids, False)
    new_ids = run.result.new_ids
    if new_ids is not None and new_ids.numel():
        table.set_frozen(new_ids, False)
        if run.stay_frozen.numel():
            table.set_frozen(run.stay_frozen, True)
    if bool(was_frozen.any()):
        table.set_frozen(run.old_ids[was_frozen[:n_old]], True)
    model.eval()
    if publish and getattr(table, "store_root", None):
        run.result.version = table.snapshot()
    run.result.seconds = time.perf_counter() - t0
    return run.result
