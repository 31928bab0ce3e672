"""The quality benchmark's protocol (issue 24): what is compared, on which prompts, and
how the one figure per family is chosen.

- `VARIANTS`: per model family, the configurations tuned over. Every family gets the same
  number of trials of the same kind of knob, fixed before any run: its preset, and one
  other way of spending the same active parameters (the knowledge model: one knowledge
  layer and a wider FFN instead of two layers; MoE: 32 finer experts, 4 active, instead of
  16 with 2; dense: 5 narrower blocks instead of 4).
- `split_examples`: the trained facts' held-out-phrasing prompts (and the held-out loss
  texts, and the seen-phrasing prompts) cut by fact into a tuning half and a test half;
  all phrasings of one fact stay on one side.
- `choose`: a family's winner from its trials' tuning-half metrics only (it is handed
  nothing else).
- `headline`: the test half's figures over the reported seeds (mean, median, min, max,
  seed s.e.) and the knowledge-minus-best-baseline difference with a seed s.e. and a
  bootstrap interval over test facts.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from benchmarks.continual_eval import bootstrap, fact_key, split_keys
from model_worker import evaluate
from model_worker.data import ByteTokenizer, packed_batches
from model_worker.generate import generate_fn


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)   # ModelConfig fields ("knowledge": merged in)
    what: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _family(family: str, *variants: tuple[str, str, dict, str]) -> list[Variant]:
    return [Variant(n, family, p, o, w) for n, p, o, w in variants]


# Active parameters (model.count_params; the knowledge models with the benchmark's 16k-row
# table): dense 242.5k / 245.2k; MoE 245.8k / 248.4k (total 0.99M / 1.13M); knowledge 2l
# 242.6k / 1l 243.0k.
VARIANTS: dict[str, dict[str, list[Variant]]] = {
    "small": {
        "dense": _family("dense", ("dense", "small-dense", {}, "4 blocks, d_ff 208"),
                         ("dense_5x152", "small-dense", {"n_layers": 5, "d_ff": 152}, "5 blocks, d_ff 152")),
        "moe": _family("moe", ("moe", "small-moe", {}, "16 experts, 2 active"),
                       ("moe_32x4", "small-moe", {"n_experts": 32, "n_active": 4},
                        "32 narrower experts, 4 active")),
        "knowledge": _family("knowledge", ("knowledge_2l", "small-knowledge-2l", {},
                                           "knowledge layers beside blocks 1 and 2, d_ff 144"),
                             ("knowledge_1l", "small-knowledge", {}, "one knowledge layer beside block 2, d_ff 176")),
    },
    # the same shape of protocol on the test models (seconds per run)
    "tiny": {
        "dense": _family("dense", ("dense", "tiny-dense", {}, "2 blocks"),
                         ("dense_3l", "tiny-dense", {"n_layers": 3}, "3 blocks")),
        "moe": _family("moe", ("moe", "tiny-moe", {}, "4 experts, 2 active"),
                       ("moe_8x4", "tiny-moe", {"n_experts": 8, "n_active": 4}, "8 experts, 4 active")),
        "knowledge": _family("knowledge", ("knowledge_1l", "tiny-knowledge", {}, "knowledge layer in block 1"),
                             ("knowledge_2l", "tiny-knowledge", {"knowledge": {"layers": [0, 1]}}, "blocks 0 and 1")),
    },
}


def merge_overrides(base: dict, extra: dict) -> dict:
    """`extra` over `base`, the "knowledge" dict merged field by field."""
    out = {**base, **extra}
    if "knowledge" in base and "knowledge" in extra:
        out["knowledge"] = {**base["knowledge"], **extra["knowledge"]}
    return out


def split_examples(corpus, seed: int) -> dict[str, dict]:
    """{"tune" | "test": {"eval", "seen", "texts", "facts"}}: the trained facts (keys
    (subject, relation)) shuffled by `seed` and cut in two; a half holds its facts'
    held-out-phrasing prompts (eval), seen-phrasing prompts (seen) and held-out loss texts
    (the eval prompts' full sentences, as corpus.heldout_texts). Deterministic."""
    tune_keys, test_keys = split_keys(corpus.eval, seed)
    out = {}
    for name, keys in (("tune", tune_keys), ("test", test_keys)):
        ev = [e for e in corpus.eval if fact_key(e) in keys]
        out[name] = {"eval": ev, "seen": [e for e in corpus.eval_seen if fact_key(e) in keys],
                     "texts": [e.text for e in ev], "facts": sorted(keys)}
    return out


@torch.no_grad()
def evaluate_half(model, half: dict, seq_len: int, batch_size: int, eval_batch_size: int,
                  seen: bool = True) -> dict:
    """Recall on the half's held-out phrasings (per prompt, in `half["eval"]`'s order),
    held-out loss on its texts and, with `seen`, recall on its seen phrasings. Rows are
    read by fetch, so evaluation leaves the store's usage counts alone."""
    model.eval()
    tok = ByteTokenizer()
    fn = generate_fn(model, tok)
    dev = model.output.weight.device
    with model.reading(readout="fetch"):
        batches = packed_batches(half["texts"], tok, seq_len, batch_size)
        loss = evaluate.heldout_loss(lambda b: model(b.inputs.to(dev), b.targets.to(dev))[1], batches)["loss"]
        r = evaluate.recall_on_examples(fn, half["eval"], batch_size=eval_batch_size, return_predictions=True)
        right = [int(evaluate.normalize_answer(p) == evaluate.normalize_answer(e.answer))
                 for p, e in zip(r["predictions"], half["eval"])]
        out = {"recall_heldout": r["recall"], "n": r["n"], "heldout_loss": loss, "right": right,
               "by_type": {t: round(v["recall"], 4) for t, v in r["by_type"].items()}}
        if seen:
            s = evaluate.recall_on_examples(fn, half["seen"], batch_size=eval_batch_size)
            out["recall_seen"] = s["recall"]
    return out


def choose(tune_metrics: dict[str, list[dict]]) -> str:
    """The winner among a family's variants, from the tuning half only: the highest mean
    held-out-phrasing recall over the tuning seeds, ties to the lower mean held-out loss,
    then to the variant listed first. `tune_metrics`: {variant: [{"recall_heldout",
    "heldout_loss"} per tuning seed]}."""
    def key(item):
        i, (name, runs) = item
        return (-statistics.fmean(r["recall_heldout"] for r in runs),
                statistics.fmean(r["heldout_loss"] for r in runs), i)
    return min(enumerate(tune_metrics.items()), key=key)[1][0]


def spread(xs: Sequence[float]) -> dict:
    """Mean, median, min, max, n and the mean's standard error over seeds (None for one)."""
    xs = list(xs)
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None
    return {"mean": m, "median": statistics.median(xs), "min": min(xs), "max": max(xs), "se": se, "n": len(xs)}


def per_fact(rights: Sequence[Sequence[int]], fact_of_prompt: Sequence[int], n_facts: int) -> list[float]:
    """Per test fact, its share of right answers over its phrasings and over the runs."""
    tot, cnt = [0.0] * n_facts, [0] * n_facts
    for right in rights:
        for f, r in zip(fact_of_prompt, right):
            tot[f] += r
            cnt[f] += 1
    return [t / c for t, c in zip(tot, cnt) if c]


def difference(test: dict[str, list[dict]], a: str, b: str, fact_of_prompt: Sequence[int], n_facts: int,
               seed: int = 0) -> dict:
    """Family a minus family b on the test half: paired by seed (mean, seed s.e., min, max)
    and a 95% percentile bootstrap over test facts of the per-fact recall difference."""
    by_seed_a = {r["seed"]: r for r in test[a]}
    pairs = [(by_seed_a[r["seed"]], r) for r in test[b] if r["seed"] in by_seed_a]
    diffs = [ra["recall_heldout"] - rb["recall_heldout"] for ra, rb in pairs]
    fa = per_fact([ra["right"] for ra, _ in pairs], fact_of_prompt, n_facts)
    fb = per_fact([rb["right"] for _, rb in pairs], fact_of_prompt, n_facts)
    return {"paired_by_seed": {**spread(diffs), "per_seed": {ra["seed"]: d for (ra, _), d in zip(pairs, diffs)}},
            "bootstrap_over_test_facts": bootstrap(fa, fb, seed=seed)}


def headline(tuning: dict, test: dict[str, list[dict]], split: dict, seeds: list, tune_seeds: list,
             corpus: str, steps: int) -> dict:
    """`tuning`: {family: {"trials", "tried": [...], "winner"}}; `test`: {family: [the
    winner's run per reported seed]}; `split`: the counts and the test prompts' fact index."""
    fams = list(test)
    out = {"protocol": "variant of each family chosen on the tuning half (tuning seeds), reported on the test half "
                       "(reported seeds) only",
           "corpus": corpus, "steps": steps, "seeds": list(seeds), "tuning_seeds": list(tune_seeds),
           "split": {k: split[k] for k in ("split_seed", "tune_facts", "tune_prompts", "test_facts", "test_prompts")},
           "tuning_trials_per_family": {f: tuning[f]["trials"] for f in fams},
           "chosen": {f: tuning[f]["winner"] for f in fams},
           "test": {}}
    for f in fams:
        runs = test[f]
        out["test"][f] = {"variant": runs[0]["variant"]["name"],
                          "recall_heldout": spread([r["recall_heldout"] for r in runs]),
                          "heldout_loss": spread([r["heldout_loss"] for r in runs]),
                          "recall_seen": spread([r["recall_seen"] for r in runs]),
                          "active_params": runs[0]["params"]["active"], "total_params": runs[0]["params"]["total"],
                          "training_tokens": runs[0]["tokens"]}
    baselines = [f for f in fams if f != "knowledge"]
    if "knowledge" in fams and baselines:
        fop, nf = split["test_fact_of_prompt"], split["test_facts"]
        best = max(baselines, key=lambda f: (out["test"][f]["recall_heldout"]["mean"], -baselines.index(f)))
        out["knowledge_minus"] = {f: difference(test, "knowledge", f, fop, nf) for f in baselines}
        out["best_baseline"] = best
        out["knowledge_minus_best_baseline"] = {"baseline": best, **out["knowledge_minus"][best]}
    return out
