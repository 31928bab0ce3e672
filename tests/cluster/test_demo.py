"""The demo's fixed questions and facts are what it says they are, and a short run on
a tiny model goes through every stage and writes summary.json."""
from __future__ import annotations

import json

import pytest

from cluster import demo
from model_worker.data import build_corpus
from model_worker.data.corpus_config import CorpusConfig
from model_worker.data.templates import TEMPLATES


def test_questions_are_trained_phrasings_of_corpus_facts_and_the_held_out_one_is_not():
    corpus = build_corpus(demo.DemoConfig().corpus)
    trained = {(e.prompt, e.answer) for e in corpus.train}
    for q in demo.QUESTIONS:
        assert q in trained, f"{q} is not a trained phrasing of a demo-corpus fact"
    held = {(e.prompt, e.answer) for e in corpus.eval}
    assert demo.HELD_OUT in held and demo.HELD_OUT not in trained
    assert 4 in CorpusConfig.preset(demo.DemoConfig().corpus).heldout_templates


def test_new_facts_are_not_in_the_corpus_and_are_asked_on_an_untaught_phrasing():
    corpus = build_corpus(demo.DemoConfig().corpus)
    text = "\n".join(corpus.train_texts + corpus.heldout_texts + [e.text for e in corpus.new_train])
    for subject, answer in demo.NEW_FACTS:
        assert subject not in text and answer not in text
    lines = demo.new_fact_lines()
    assert len(lines) == len(demo.NEW_FACTS) * len(demo.TAUGHT_TEMPLATES)
    assert demo.ASKED_TEMPLATE not in demo.TAUGHT_TEMPLATES
    asked = {demo._prompt(demo.ASKED_TEMPLATE, s) for s, _ in demo.NEW_FACTS}
    assert not asked & {line.split("\t")[0] for line in lines}
    assert demo._prompt(0, "Peru") == "The capital of Peru is" and len(TEMPLATES["capital_of"]) > demo.ASKED_TEMPLATE


def test_ablation_rows_leave_out_what_other_answers_use():
    behind = [[5, 1, 9, 2], [9, 7], [3, 2], [8]]
    assert demo.ablation_rows(behind, 0, [1, 2]) == [5, 1]
    assert demo.ablation_rows(behind, 0, []) == [5, 1, 9, 2]


@pytest.mark.slow
def test_a_short_demo_runs_every_stage(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    cfg = demo.DemoConfig(steps=30, model="tiny-knowledge", model_overrides={}, rows_per_answer=4,
                          ablation_rounds=1, learn_steps=2, background_batches=2)
    try:
        s = demo.run_demo(store_root=str(tmp_path / "demo"), config=cfg)
    finally:
        ray.shutdown()
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved == s
    for key in ("asked", "known_answers", "ablation_changed_answer", "others_unchanged_by_ablation",
                "swap_restored_answer", "learned_facts", "learned_facts_answered", "seconds"):
        assert key in s
    assert s["asked"] == 4 and s["learned_facts"] == len(demo.NEW_FACTS) and s["new_rows"] > 0
    assert 0 <= s["learned_facts_answered"] <= s["learned_facts"] and s["seconds"] > 0
    assert "summary" in capsys.readouterr().out
