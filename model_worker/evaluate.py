"""Model-agnostic evaluation: fact recall and held-out loss.

The model side provides two callables:

    generate_fn(prompts: list[str], max_new_tokens: int) -> list[str]
        greedy continuations of the prompts (the generated text only, not the
        prompt); it should stop at EOS. Text after the first newline is ignored.
    loss_fn(batch: Batch) -> float | 0-d tensor
        mean cross-entropy over the batch's scored targets (targets != -100).

    r = fact_recall(generate_fn, corpus.eval_prompts, corpus.eval_answers, corpus.eval_fact_types)
    r["recall"], r["by_type"]["capital_of"]["recall"]
    heldout_loss(loss_fn, packed_batches(corpus.heldout_texts, tok, 128, 32))["loss"]

A prediction is correct when ``normalize_answer(prediction) == normalize_answer(answer)``:
first line only, Unicode NFKC, case-folded, whitespace collapsed, trailing
punctuation stripped. So " Paris.", "paris" and "Paris\\nThe..." all match "Paris".
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch

_TRAILING_PUNCT = ".,;:!?\"'"


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).split("\n", 1)[0]
    text = re.sub(r"\s+", " ", text).strip().rstrip(_TRAILING_PUNCT).strip()
    return text.casefold()


def default_max_new_tokens(answers: Sequence[str]) -> int:
    """Enough for any tokenizer whose tokens are >= 1 byte: longest answer + space, punctuation, EOS."""
    return max((len(a.encode("utf-8")) for a in answers), default=0) + 4


def fact_recall(generate_fn: Callable[[list[str], int], list[str]], prompts: Sequence[str],
                answers: Sequence[str], fact_types: Sequence[str] | None = None,
                max_new_tokens: int | None = None, batch_size: int = 64,
                return_predictions: bool = False) -> dict:
    """Exact-match recall of answers, overall and per fact type.

    Returns {"recall": float, "correct": int, "n": int,
             "by_type": {type: {"recall", "correct", "n"}},
             "predictions": [str] (only with return_predictions)}.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if fact_types is None:
        fact_types = ["all"] * len(prompts)
    if len(fact_types) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(fact_types)} fact types")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(answers)

    predictions: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s:s + batch_size])
        out = generate_fn(chunk, max_new_tokens)
        if len(out) != len(chunk):
            raise ValueError(f"generate_fn returned {len(out)} outputs for {len(chunk)} prompts")
        predictions.extend(out)

    correct = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    by_type: dict = defaultdict(lambda: {"correct": 0, "n": 0})
    for t, c in zip(fact_types, correct):
        by_type[t]["correct"] += int(c)
        by_type[t]["n"] += 1
    for v in by_type.values():
        v["recall"] = v["correct"] / v["n"]
    n = len(correct)
    result = {"recall": sum(correct) / n if n else 0.0, "correct": sum(correct), "n": n,
              "by_type": dict(sorted(by_type.items()))}
    if return_predictions:
        result["predictions"] = predictions
    return result


def recall_on_examples(generate_fn, examples, **kwargs) -> dict:
    """fact_recall over corpus Examples (corpus.eval, corpus.new_eval, ...)."""
    return fact_recall(generate_fn, [e.prompt for e in examples], [e.answer for e in examples],
                       [e.relation for e in examples], **kwargs)


def heldout_loss(loss_fn: Callable, batches: Iterable) -> dict:
    """Mean loss over batches, weighted by each batch's scored targets (batch.num_targets
    when the batch has it, else 1). Runs under torch.no_grad().

    Returns {"loss": float, "ppl": float, "tokens": int, "batches": int}.
    """
    total, weight, n_batches = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            loss = loss_fn(batch)
            loss = float(loss.item() if torch.is_tensor(loss) else loss)
            w = getattr(batch, "num_targets", 1)
            if w == 0:
                continue
            total += loss * w
            weight += w
            n_batches += 1
    mean = total / weight if weight else float("nan")
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)) if weight else float("nan"),
            "tokens": weight, "batches": n_batches}
