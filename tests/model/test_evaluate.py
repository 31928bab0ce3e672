"""fact_recall and heldout_loss on toy models."""

import math

import pytest
import torch
import torch.nn.functional as F

from model_worker.data import ByteTokenizer, build_corpus, packed_batches
from model_worker.evaluate import (default_max_new_tokens, fact_recall, heldout_loss, normalize_answer,
                                   recall_on_examples)


def test_normalize_answer():
    assert normalize_answer(" Paris.") == normalize_answer("paris") == "paris"
    assert normalize_answer("Paris\nThe capital of Spain is Madrid.") == "paris"
    assert normalize_answer("  São   Paulo ") == "são paulo"
    assert normalize_answer("Washington, D.C.") == normalize_answer("Washington, D.C")
    assert normalize_answer("Asia/Ho_Chi_Minh") == "asia/ho_chi_minh"
    assert normalize_answer("Paris Saint") != normalize_answer("Paris")


def test_fact_recall_toy():
    prompts = ["capital of France", "capital of Spain", "code of France", "code of Spain"]
    answers = ["Paris", "Madrid", "FRA", "ESP"]
    types = ["capital_of", "capital_of", "alpha3_of", "alpha3_of"]
    table = {"capital of France": " Paris.", "capital of Spain": " Barcelona.",
             "code of France": " fra\nmore text", "code of Spain": " ESP"}
    calls = []

    def generate_fn(ps, max_new_tokens):
        calls.append((len(ps), max_new_tokens))
        return [table[p] for p in ps]

    r = fact_recall(generate_fn, prompts, answers, types, batch_size=3, return_predictions=True)
    assert r["n"] == 4 and r["correct"] == 3 and r["recall"] == 0.75
    assert r["by_type"]["capital_of"] == {"correct": 1, "n": 2, "recall": 0.5}
    assert r["by_type"]["alpha3_of"]["recall"] == 1.0
    assert r["predictions"][1] == " Barcelona."
    assert calls == [(3, 10), (1, 10)]  # batched; default budget = longest answer bytes + 4
    assert default_max_new_tokens(["Zürich"]) == 7 + 4

    r = fact_recall(generate_fn, prompts, answers)  # no types: one bucket
    assert set(r["by_type"]) == {"all"}
    with pytest.raises(ValueError):
        fact_recall(lambda ps, n: ps[:-1], prompts, answers)


def test_recall_on_corpus_with_oracle():
    corpus = build_corpus("tiny")
    oracle = {e.prompt: e.completion for e in corpus.eval + corpus.new_eval}
    gen = lambda ps, n: [oracle[p] for p in ps]
    r = recall_on_examples(gen, corpus.eval)
    assert r["recall"] == 1.0 and set(r["by_type"]) == set(corpus.relations)
    assert fact_recall(lambda ps, n: [""] * len(ps), corpus.eval_prompts, corpus.eval_answers,
                       corpus.eval_fact_types)["recall"] == 0.0


def test_heldout_loss_weighted_by_tokens():
    corpus = build_corpus("tiny")
    tok = ByteTokenizer()
    batches = packed_batches(corpus.heldout_texts[:40], tok, seq_len=64, batch_size=4)

    def uniform_loss(batch):  # a uniform model: loss = log(V) on every scored token
        logits = torch.zeros(*batch.inputs.shape, tok.vocab_size)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())

    r = heldout_loss(uniform_loss, batches)
    assert r["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    assert r["ppl"] == pytest.approx(tok.vocab_size, rel=1e-4)
    assert r["tokens"] == sum(b.num_targets for b in batches) and r["batches"] == len(batches)
    # weighting: two batches with 1 and 3 targets
    class B:
        def __init__(self, n): self.num_targets = n
    assert heldout_loss(lambda b: float(b.num_targets), [B(1), B(3)])["loss"] == pytest.approx(2.5)


def test_recall_does_not_depend_on_the_generation_batch():
    """eval_batch_size only groups prompts differently (equal-length groups, no padding)."""
    from model_worker.config import preset
    from model_worker.generate import generate_fn
    from model_worker.model import Transformer
    torch.manual_seed(0)
    model = Transformer(preset("tiny-dense")).eval()
    corpus = build_corpus("tiny")
    prompts, answers = corpus.eval_prompts[:96], corpus.eval_answers[:96]
    fn = generate_fn(model, ByteTokenizer())
    small = fact_recall(fn, prompts, answers, max_new_tokens=8, batch_size=7, return_predictions=True)
    large = fact_recall(fn, prompts, answers, max_new_tokens=8, batch_size=1024, return_predictions=True)
    assert small["predictions"] == large["predictions"]
