"""Continual learning: new knowledge = new rows, trained alone (DESIGN.md section 1, point 2).

    from model_worker.learn import LearnConfig, learn
    result = learn(model, table, corpus.new_train, tok, LearnConfig(steps=300))
    result.version, result.new_ids, result.losses

Modules, by job:

    config.py          TextFact, facts_from_lines, LearnConfig, LearnResult
    registry.py        the learn methods by name (LearnMethod, register)
    loop.py            learn: run a method, restore the old rows' freeze flags, publish
    steps.py           the training loop the methods share
    new_rows.py        the method "new_rows" (new rows only; model and old rows bitwise unchanged)
    baselines.py       "sparse_memory", "full_finetune", "lora"
    queries.py         the knowledge layers' queries on the new text, grouped
    keys.py            new rows' keys and selection biases from those queries
    plan.py            which rows new_rows appends: keys, cue / gate tags, detectors
    row_optimizer.py   the store's row optimizer for the length of a run
    measure.py         recall, forgetting, how new rows are read (imported on its own: it generates)
    migrate.py         store versions written before detectors had their own partition

Measured results and the settings tried: benchmarks/CONTINUAL_NOTES.md.
"""
from .config import LearnConfig, LearnResult, TextFact, facts_from_lines
from .loop import learn
from .registry import METHODS, LearnMethod, LearnRun, register

__all__ = ["LearnConfig", "LearnResult", "TextFact", "facts_from_lines", "learn",
           "METHODS", "LearnMethod", "LearnRun", "register"]
