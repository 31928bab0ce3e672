"""Corpus, tokenizer and loader tests (tiny preset; a few seconds)."""

import re
from collections import defaultdict

import pytest
import torch

from model_worker.data import (BOS_ID, EOS_ID, IGNORE_INDEX, TEMPLATES, ByteTokenizer, CorpusConfig,
                               ExampleLoader, PackedLoader, build_corpus, collate_examples, load_tokenizer,
                               packed_batches, split_template, split_texts, tokenizer_from_dict)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus("tiny")


# ----------------------------------------------------------------------------- corpus

def test_corpus_deterministic(corpus):
    again = build_corpus(CorpusConfig.preset("tiny"))
    assert again.train == corpus.train and again.eval == corpus.eval
    assert again.new_facts == corpus.new_facts
    assert again.fingerprint() == corpus.fingerprint()
    other = build_corpus(CorpusConfig.preset("tiny", seed=1))
    assert other.fingerprint() != corpus.fingerprint()


def test_tiny_size_and_all_relations(corpus):
    stats = corpus.stats()
    assert 200 <= stats["facts"] + stats["new_facts"] <= 500
    assert set(stats["facts_per_relation"]) == set(TEMPLATES)
    assert all(n > 0 for n in stats["facts_per_relation"].values())
    assert all(n >= 4 for n in stats["templates_per_relation"].values())


def test_small_preset_size():
    stats = build_corpus("small").stats()
    assert 2000 <= stats["facts"] + stats["new_facts"] <= 5000


def test_max_text_bytes():
    c = build_corpus(CorpusConfig.preset("tiny", max_text_bytes=70))
    assert c.stats()["max_text_bytes"] <= 70 and c.dropped["long_text"] > 0


def test_cli_dump(tmp_path, capsys):
    from model_worker.data.__main__ import main
    main(["--preset", "tiny", "--dump", str(tmp_path)])
    assert '"facts"' in capsys.readouterr().out
    assert (tmp_path / "eval.jsonl").read_text().count("\n") == len(build_corpus("tiny").eval)


def _template_regex(template):
    prefix, suffix = split_template(template)
    parts = [re.escape(p) for p in prefix.split("{s}")]
    return re.compile(parts[0] + "(.+)" + parts[1] + " (.+)" + re.escape(suffix))


def test_heldout_templates_never_in_train(corpus):
    held = corpus.config.heldout_templates
    regexes = [_template_regex(t) for ts in TEMPLATES.values() for i, t in enumerate(ts) if i in held]
    assert regexes
    # the regexes do recognise held-out renderings
    assert all(any(rx.fullmatch(e.text) for rx in regexes) for e in corpus.eval)
    texts = corpus.train_texts + [e.text for e in corpus.new_train]
    for text in texts:
        for rx in regexes:
            assert not rx.fullmatch(text), (text, rx.pattern)
    assert all(e.template_id not in held for e in corpus.train + corpus.new_train)
    assert all(e.template_id in held for e in corpus.eval + corpus.new_eval)
    # eval prompts are not prefixes of any train text
    train_prompts = {e.prompt for e in corpus.train}
    assert not train_prompts & set(corpus.eval_prompts)


def test_every_trained_fact_has_eval_prompts(corpus):
    assert len(corpus.eval) == len(corpus.facts) * len(corpus.config.heldout_templates)
    assert {(e.subject, e.relation) for e in corpus.eval} == {(f.subject, f.relation) for f in corpus.facts}
    for e in corpus.eval[:50]:
        assert e.text.startswith(e.prompt) and e.answer in e.completion
        assert not e.prompt.endswith(" ") and e.completion.startswith(" ")


def test_answers_unambiguous(corpus):
    for facts in (corpus.facts + corpus.new_facts,):
        by_key = defaultdict(set)
        for f in facts:
            by_key[f.subject, f.relation].add(f.answer)
        assert all(len(a) == 1 for a in by_key.values())
    by_prompt = defaultdict(set)
    for e in corpus.train + corpus.eval + corpus.eval_seen + corpus.new_train + corpus.new_eval:
        by_prompt[e.prompt].add(e.answer)
    assert all(len(a) == 1 for a in by_prompt.values())
    for f in corpus.facts + corpus.new_facts:
        assert f.answer and len(f.answer.split()) <= corpus.config.max_answer_words


def test_ambiguous_city_names_dropped(corpus):
    city_subjects = {f.subject for f in corpus.facts + corpus.new_facts if f.relation == "country_of_city"}
    # London (GB, CA) and Moscow (RU, US) occur more than once in geonames
    assert "London" not in city_subjects and "Moscow" not in city_subjects
    assert corpus.dropped.get("ambiguous_city_name", 0) > 0


def test_new_facts_disjoint_from_train(corpus):
    assert corpus.new_facts
    trained = {(f.subject, f.relation) for f in corpus.facts}
    assert not trained & {(f.subject, f.relation) for f in corpus.new_facts}
    assert not {f.group for f in corpus.facts} & {f.group for f in corpus.new_facts}
    train_texts = set(corpus.train_texts)
    assert not train_texts & {e.text for e in corpus.new_train + corpus.new_eval}
    # no new answer appears next to its subject in pretraining text (inverse relations share a group)
    for f in corpus.new_facts:
        if f.relation == "capital_of":
            assert not any(f.subject in t and f.answer in t for t in corpus.train_texts), f


def test_relation_subset_and_validation():
    c = build_corpus(CorpusConfig(relations=("capital_of", "alpha3_of"), max_countries=20, max_cities=0))
    assert {f.relation for f in c.facts + c.new_facts} == {"capital_of", "alpha3_of"}
    with pytest.raises(ValueError):
        CorpusConfig(relations=("no_such_relation",))
    with pytest.raises(ValueError):
        CorpusConfig(heldout_templates=(0, 1, 2, 3, 4))


def test_known_facts_present():
    c = build_corpus(CorpusConfig(max_countries=40, max_cities=0, new_fact_fraction=0.0))
    facts = {(f.subject, f.relation): f.answer for f in c.facts}
    assert facts["France", "capital_of"] == "Paris"
    assert facts["Paris", "country_of_capital"] == "France"
    assert facts["France", "alpha3_of"] == "FRA"
    assert facts["France", "continent_of"] == "Europe"
    assert facts["France", "currency_of"] == "Euro"
    assert facts["France", "language_of"] == "French"
    assert facts["France", "official_name_of"] == "French Republic"


# ----------------------------------------------------------------------------- tokenizer

SAMPLES = ["", "The capital of France is Paris.", "São Paulo is a city in Brazil.",
           "Zürich, Kraków, Reykjavík, 東京, Москва, القاهرة, e\u0301", "Asia/Ho_Chi_Minh  12345\n\tx"]


def test_tokenizer_roundtrip(corpus, tmp_path):
    tok = ByteTokenizer()
    texts = SAMPLES + corpus.train_texts[:200] + [f.subject for f in corpus.facts]
    for t in texts:
        ids = tok.encode(t, bos=True, eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == t
    tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert all(loaded.encode(t) == tok.encode(t) for t in texts)


def test_byte_ids_are_the_utf8_bytes_and_checkpoints_name_the_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and (tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id) == (256, 257, 258, 259)
    assert tok.encode("Zürich", bos=True, eos=True) == [256, *"Zürich".encode("utf-8"), 257]
    assert isinstance(tokenizer_from_dict({"type": "byte"}), ByteTokenizer)     # what every checkpoint records
    with pytest.raises(ValueError, match="only 'byte'"):
        tokenizer_from_dict({"type": "bpe", "merges": []})


# ----------------------------------------------------------------------------- loaders

def test_packed_loader_resumable(corpus):
    tok = ByteTokenizer()
    a = PackedLoader(corpus.train_texts, tok, seq_len=64, batch_size=8, seed=3)
    spe = a.steps_per_epoch
    steps = [0, 1, spe - 1, spe, spe + 5, 3 * spe + 2]
    ref = {s: a.batch(s) for s in steps}
    for s in steps:
        b = PackedLoader(corpus.train_texts, tok, seq_len=64, batch_size=8, seed=3, start_step=s)
        got = next(iter(b))
        assert got.step == s
        assert torch.equal(got.inputs, ref[s].inputs) and torch.equal(got.targets, ref[s].targets)
    # iteration == indexing; state_dict carries the position
    it = iter(PackedLoader(corpus.train_texts, tok, seq_len=64, batch_size=8, seed=3))
    for s in range(3):
        assert torch.equal(next(it).inputs, a.batch(s).inputs)
    c = PackedLoader(corpus.train_texts, tok, seq_len=64, batch_size=8, seed=3)
    c.load_state_dict(it.state_dict())
    assert torch.equal(next(c).inputs, a.batch(3).inputs)
    with pytest.raises(ValueError):  # a position saved for other data/shapes is refused
        PackedLoader(corpus.train_texts, tok, seq_len=32, batch_size=8, seed=3).load_state_dict(it.state_dict())
    # epochs are reshuffled, seeds differ
    assert not torch.equal(a.batch(0).inputs, a.batch(spe).inputs)
    d = PackedLoader(corpus.train_texts, tok, seq_len=64, batch_size=8, seed=4)
    assert not torch.equal(a.batch(0).inputs, d.batch(0).inputs)


def test_packed_loader_content(corpus):
    tok = ByteTokenizer()
    loader = PackedLoader(corpus.train_texts, tok, seq_len=32, batch_size=4, seed=0)
    b = loader.batch(0)
    assert b.inputs.shape == b.targets.shape == (4, 32) and b.inputs.dtype == torch.long
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert b.num_targets == 4 * 32
    # one epoch covers every document: BOS count equals the number of texts
    n_bos = sum(int((loader.batch(s).inputs == BOS_ID).sum()) for s in range(loader.steps_per_epoch))
    assert len(corpus.train_texts) - 4 * 2 <= n_bos <= len(corpus.train_texts)


def test_packed_batches_cover_all_tokens(corpus):
    tok = ByteTokenizer()
    texts = corpus.heldout_texts
    batches = packed_batches(texts, tok, seq_len=50, batch_size=8)
    n_tokens = sum(len(tok.encode(t)) + 2 for t in texts)
    assert sum(b.num_targets for b in batches) == n_tokens - 1
    assert packed_batches(texts, tok, 50, 8)[0].inputs.equal(batches[0].inputs)


def test_example_batches_score_answer_only(corpus):
    tok = ByteTokenizer()
    exs = corpus.new_train[:5]
    b = collate_examples(exs, tok)
    for row, e in enumerate(exs):
        scored = b.targets[row][b.targets[row] != IGNORE_INDEX].tolist()
        assert scored == tok.encode(e.completion, eos=True)
    loader = ExampleLoader(corpus.new_train, tok, batch_size=4, seed=0)
    again = ExampleLoader(corpus.new_train, tok, batch_size=4, seed=0, start_step=7)
    assert torch.equal(loader.batch(7).inputs, next(again).inputs)


def test_split_texts():
    texts = [f"t{i}" for i in range(100)]
    train, held = split_texts(texts, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert split_texts(texts, 0.1, seed=0) == (train, held)


def test_more_paraphrases_same_facts_and_heldout_still_unseen():
    few = build_corpus(CorpusConfig.preset("tiny"))
    many = build_corpus(CorpusConfig.preset("tiny", num_templates=10))
    assert many.facts == few.facts and many.new_facts == few.new_facts
    assert [e.text for e in many.eval] == [e.text for e in few.eval]           # the same held-out phrasings
    assert len(many.train) == len(few.train) * 9 // 4                          # 9 training paraphrases, not 4
    held = {e.prompt for e in many.eval}
    assert not held & {e.prompt for e in many.train}
    regexes = [_template_regex(ts[4]) for ts in TEMPLATES.values()]
    assert not any(rx.fullmatch(e.text) for e in many.train for rx in regexes)
    with pytest.raises(ValueError, match="num_templates"):
        CorpusConfig.preset("tiny", num_templates=11)
