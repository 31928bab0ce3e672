"""The bioS biography corpus (model_worker/data/bios): fixed lists of known size, a
deterministic population, renderings that say each fact exactly once, piecewise
tokenization equal to whole-text tokenization, and a training stream that shows every
person E times and resumes exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_worker.data.bios.batches import BioStream, exposure_tokens
from model_worker.data.bios.evalsets import bio_rows, prompt_rows
from model_worker.data.bios.lists import (ATTRIBUTES, DAYS, FIRST_YEAR, MONTHS, information_bits_per_person,
                                          value_lists)
from model_worker.data.bios.pieces import tokenize_pieces
from model_worker.data.bios.population import make_population, subset
from model_worker.data.bios.stream import ROLE_NAME, render, render_texts, rows_to_tokens
from model_worker.data.bios.templates import QUESTIONS, TEMPLATES, TRAIN_TEMPLATES, split_template
from model_worker.data.bios.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def pieces():
    return tokenize_pieces(train_tokenizer(512, sample_people=2000))


def _value_text(pop, i: int, attribute: str) -> str:
    lists = value_lists()
    if attribute == "birth_date":
        return f"{MONTHS[pop.month[i]]} {pop.day[i] + 1}, {FIRST_YEAR + pop.year[i]}"
    if attribute == "employer_city":
        return lists.cities[pop.employer_city[i]]
    table = {"birth_city": lists.cities, "university": lists.universities, "major": lists.majors,
             "employer": lists.employers}[attribute]
    return table[getattr(pop, attribute)[i]]


def test_lists_have_the_papers_sizes_distinct_values_and_no_full_stop():
    lists = value_lists()
    sizes = {"first": 400, "middle": 400, "last": 1000, "cities": 200, "universities": 300, "majors": 100,
             "employers": 263}
    for name, n in sizes.items():
        values = getattr(lists, name)
        assert len(values) == n and len(set(values)) == n, name
        assert not any("." in v for v in values), name
    assert lists.num_names == 160_000_000
    assert lists.employer_city.shape == (263,) and lists.employer_city.max() < 200
    bits = information_bits_per_person()
    assert bits["birth_date"] == pytest.approx(math.log2(12 * 28 * 200)) and bits["employer_city"] == 0
    assert sum(bits.values()) == pytest.approx(46.59, abs=0.01)
    assert value_lists() is value_lists()


def test_population_is_deterministic_with_unique_names_and_values_in_range():
    a, b, c = make_population(5000, seed=3), make_population(5000, seed=3), make_population(5000, seed=4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    names = a.first.astype(np.int64) * 400_000 + a.middle.astype(np.int64) * 1000 + a.last
    assert len(np.unique(names)) == 5000
    assert a.month.max() < 12 and a.day.max() < DAYS and a.year.max() < 200 and a.employer.max() < 263
    # uniform draws: every birth city shows up in 5000 people (expected 25 each)
    assert len(np.unique(a.birth_city)) == 200
    with pytest.raises(ValueError):
        make_population(0)


def test_templates_name_the_subject_first_and_hold_some_out():
    for a in ATTRIBUTES:
        assert len(TEMPLATES[a]) > TRAIN_TEMPLATES
        for t in TEMPLATES[a]:
            kind, rest = split_template(t)
            assert kind in "sp" and rest.startswith(" ") and "{" not in rest
        assert "{n}" in QUESTIONS[a]


def test_a_biography_states_every_fact_once_named_first_then_by_pronoun(pieces):
    pop = make_population(50, seed=1)
    texts = render_texts(pop, exposure=2, seed=1)
    lists = value_lists()
    for i, text in enumerate(texts):
        name = f"{lists.first[pop.first[i]]} {lists.middle[pop.middle[i]]} {lists.last[pop.last[i]]}"
        assert text.startswith(" " + name)
        assert text.count(name) == 1
        sentences = text.strip().split(". ")
        assert len(sentences) == 6
        assert all(s.split()[0] in ("She", "He", "Her", "His") for s in sentences[1:])
        for a in ATTRIBUTES:
            assert f" {_value_text(pop, i, a)}." in text, (a, text)
        employer = text.index(_value_text(pop, i, "employer") + ".")
        assert text.index(_value_text(pop, i, "employer_city") + ".", employer) > employer   # the city follows
    assert render_texts(pop, exposure=2, seed=1) == texts and render_texts(pop, exposure=3, seed=1) != texts


def test_piecewise_tokens_equal_the_tokenizer_on_the_whole_text(pieces):
    pop = make_population(300, seed=2)
    piece_ids, _ = render(pop, pieces.ids, 2, 0)
    tok = pieces.tokenizer
    for i, text in enumerate(render_texts(pop, exposure=0, seed=2)):
        assert list(rows_to_tokens(pieces, piece_ids[i:i + 1])) == tok.encode(text, bos=True, eos=True)
    for kind in ("trained", "held_out", "question"):
        rows = prompt_rows(pop, pieces, 2, np.arange(20), kind)
        for r in range(len(rows)):
            ids = rows.tokens[r, :rows.lengths[r]].tolist()
            assert tok.encode(tok.decode(ids), bos=True) == ids


def test_the_tokenizer_trains_to_the_same_merges_every_time():
    a, b = train_tokenizer(400, sample_people=500), train_tokenizer(400, sample_people=500)
    assert a.to_json() == b.to_json() and a.vocab_size == 400


def test_roles_mark_each_value_and_its_full_stop_and_the_name(pieces):
    pop = make_population(40, seed=5)
    rows = bio_rows(pop, pieces, 5, np.arange(40))
    tok, lists = pieces.tokenizer, value_lists()
    for i in range(40):
        t, r = rows.tokens[i, :rows.lengths[i]], rows.roles[i, :rows.lengths[i]]
        for k, a in enumerate(ATTRIBUTES):
            assert tok.decode(t[r == k].tolist()) == f" {_value_text(pop, i, a)}."
        assert tok.decode(t[r == ROLE_NAME].tolist()) == \
            f" {lists.first[pop.first[i]]} {lists.middle[pop.middle[i]]} {lists.last[pop.last[i]]}"


def test_prompts_use_training_held_out_or_question_phrasings(pieces):
    pop = make_population(30, seed=6)
    tok = pieces.tokenizer
    held = {a: [split_template(t)[1] for t in TEMPLATES[a][TRAIN_TEMPLATES:]] for a in ATTRIBUTES}
    trained = {a: [split_template(t)[1] for t in TEMPLATES[a][:TRAIN_TEMPLATES]] for a in ATTRIBUTES}
    for kind in ("trained", "held_out", "question"):
        rows = prompt_rows(pop, pieces, 6, np.arange(30), kind)
        assert len(rows) == 30 * len(ATTRIBUTES)
        for r in range(len(rows)):
            a, i = ATTRIBUTES[rows.attribute[r]], rows.person[r]
            text = tok.decode(rows.tokens[r, :rows.lengths[r]].tolist())
            value = rows.tokens[r][rows.roles[r] >= 0].tolist()
            assert tok.decode(value) == f" {_value_text(pop, i, a)}." and text.endswith(tok.decode(value))
            if kind == "question":
                assert text.startswith(" Question:") and "Answer:" in text
            else:
                pool = trained[a] if kind == "trained" else held[a]
                assert any(frag + " " + _value_text(pop, i, a) + "." in text for frag in pool), text


def test_the_stream_shows_every_person_once_per_exposure_and_scores_each_token_once(pieces):
    pop = make_population(60, seed=7)
    stream = BioStream(pop, pieces, seed=7, exposures=3, seq_len=32, batch_size=4)
    bos, targets, total = 0, 0, 0
    while not stream.done:
        b = stream.batch()
        assert b.inputs.shape == (4, 32)
        bos += int((b.inputs == pieces.tokenizer.bos_id).sum())
        targets += b.num_targets
    for e in range(3):
        total += len(exposure_tokens(pop, pieces, 7, e)) - 1
    assert targets == total == stream.tokens_seen
    # every BOS but each exposure's very first token is an input somewhere (the first is input 0)
    assert bos == 3 * 60
    stream.close()


def test_a_resumed_stream_gives_the_same_batches(pieces):
    pop = make_population(40, seed=8)
    a = BioStream(pop, pieces, seed=8, exposures=2, seq_len=16, batch_size=4, prefetch=False)
    first = [a.batch() for _ in range(7)]
    state = a.state_dict()
    rest = [a.batch() for _ in range(30)]
    b = BioStream(pop, pieces, seed=8, exposures=2, seq_len=16, batch_size=4)
    b.load_state_dict(state)
    for x in rest:
        y = b.batch()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    assert not torch.equal(first[0].inputs, rest[0].inputs)
    with pytest.raises(ValueError):
        BioStream(make_population(41, seed=8), pieces, seed=8, exposures=2, seq_len=16, batch_size=4).load_state_dict(state)
    b.close()


def test_subset_keeps_the_people_asked_for():
    pop = make_population(20, seed=9)
    sub = subset(pop, np.array([5, 2]))
    assert sub.first.tolist() == [pop.first[5], pop.first[2]] and sub.employer_city[1] == pop.employer_city[2]
