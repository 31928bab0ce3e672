"""What the continual benchmark measures, and on which facts (issue 24):

- `split_facts`: the new facts (with their phrasings) and the old facts, each split by a
  fixed seed into a tuning half (every choice: learning rates, whether a method stays)
  and a test half (touched once, with the chosen settings, for the reported figures);
- `answers`: per prompt, right or wrong and what the model said;
- `compare`: per-prompt forgetting, facts lost and facts gained counted separately,
  with the list of the lost ones ("forgets nothing" only when nothing was lost);
- `tune_score`: the one criterion every method's trials are ranked by;
- `bootstrap`: intervals over facts for recall and for differences of recall.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from model_worker import evaluate
from model_worker.data import ByteTokenizer, packed_batches
from model_worker.generate import generate_fn
from model_worker.model import Transformer


def fact_key(e) -> tuple[str, str]:
    return (e.subject, e.relation)


def split_keys(examples: Sequence, seed: int) -> tuple[set, set]:
    """The distinct facts of `examples`, shuffled by `seed` and cut in two halves
    (tune, test): the same facts for every method, and the same on every run."""
    keys = sorted({fact_key(e) for e in examples})
    random.Random(seed).shuffle(keys)
    half = len(keys) // 2
    return set(keys[:half]), set(keys[half:])


def split_facts(corpus, seed: int = 24) -> dict[str, dict[str, list]]:
    """{"tune" | "test": {"new_train", "new_eval", "new_seen", "old_eval", "old_seen"}}.
    A new fact's taught phrasings (new_train) and held-out phrasings (new_eval) go to the
    same half; an old fact's held-out (eval) and seen (eval_seen) phrasings too."""
    new_tune, _ = split_keys(corpus.new_train, seed)
    old_tune, _ = split_keys(corpus.eval, seed + 1)
    out: dict[str, dict[str, list]] = {"tune": {}, "test": {}}
    for name, examples, tune_keys in (("new_train", corpus.new_train, new_tune), ("new_eval", corpus.new_eval, new_tune),
                                      ("old_eval", corpus.eval, old_tune), ("old_seen", corpus.eval_seen, old_tune)):
        out["tune"][name] = [e for e in examples if fact_key(e) in tune_keys]
        out["test"][name] = [e for e in examples if fact_key(e) not in tune_keys]
    for half in out.values():                    # one taught phrasing per new fact
        first: dict = {}
        for e in half["new_train"]:
            first.setdefault(fact_key(e), e)
        half["new_seen"] = list(first.values())
    return out


@torch.no_grad()
def answers(model: Transformer, tok: ByteTokenizer, examples: Sequence) -> dict:
    """{"recall", "correct", "n", "right": [bool per prompt], "predictions": [str]}."""
    examples = list(examples)
    if not examples:
        return {"recall": float("nan"), "correct": 0, "n": 0, "right": [], "predictions": []}
    model.eval()
    with model.reading(readout="fetch"):
        r = evaluate.recall_on_examples(generate_fn(model, tok), examples, return_predictions=True)
    right = [evaluate.normalize_answer(p) == evaluate.normalize_answer(e.answer)
             for p, e in zip(r["predictions"], examples)]
    return {"recall": r["recall"], "correct": r["correct"], "n": r["n"], "right": right, "predictions": r["predictions"]}


@torch.no_grad()
def heldout_loss(model: Transformer, tok: ByteTokenizer, texts: Sequence[str], batches: int) -> float:
    model.eval()
    with model.reading(readout="fetch"):
        bs = packed_batches(list(texts), tok, 64, 16)[:batches]
        return evaluate.heldout_loss(lambda b: model(b.inputs, b.targets)[1], bs)["loss"]


def measure_sets(model: Transformer, tok: ByteTokenizer, sets: dict[str, Sequence]) -> dict[str, dict]:
    return {name: answers(model, tok, examples) for name, examples in sets.items()}


def compare(examples: Sequence, before: dict, after: dict) -> dict:
    """Per prompt: right before and wrong after (lost), wrong before and right after
    (gained), counted separately; the lost ones listed with what the model says now."""
    lost, gained = [], []
    for e, b, a, pb, pa in zip(examples, before["right"], after["right"], before["predictions"], after["predictions"]):
        if b and not a:
            lost.append({"subject": e.subject, "relation": e.relation, "prompt": e.prompt, "answer": e.answer,
                         "now": pa.strip()})
        elif a and not b:
            gained.append({"prompt": e.prompt, "answer": e.answer})
    right = sum(before["right"])
    return {"right_before": right, "right_after": sum(after["right"]), "lost": len(lost), "gained": len(gained),
            "lost_share": len(lost) / right if right else 0.0, "lost_prompts": lost, "gained_prompts": gained}


def tune_score(new: dict, old_cmp: dict) -> float:
    """How trials are ranked, the same for every method: new-fact recall on the tuning
    half's held-out phrasings minus the share of the tuning half's old answers lost."""
    return new["recall"] - old_cmp["lost_share"]


def bootstrap(values: Sequence[float], others: Sequence[float] | None = None, n: int = 2000, seed: int = 0,
              level: float = 0.95) -> dict:
    """Mean over facts (or the mean difference values - others, paired by fact) with a
    percentile bootstrap interval over facts."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if others is not None:
        x = x - torch.tensor([float(v) for v in others], dtype=torch.float64)
    if x.numel() == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n, x.numel()), generator=g)
    means = x[idx].mean(1)
    a = (1 - level) / 2
    return {"mean": float(x.mean()), "lo": float(means.quantile(a)), "hi": float(means.quantile(1 - a)),
            "n": int(x.numel()), "level": level}
