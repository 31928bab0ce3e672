"""`learn` as a user runs it on a facts file (issue 24, items 7 and 8): fictional subjects,
several relations per subject, answers that are common words. Does the model answer a
taught fact afterwards, and do other subjects' questions stay clear of the new answers?

A tiny random model (conftest's tiny_knowledge), no old text to calibrate on
(background=None: on a random or barely trained tiny model the calibration leaves the
new rows unread, so nothing would be learnt and the leak check would pass vacuously).
Two sets of fictional subjects, each with its own model seed, so that a pass is not luck.

On such a model a knowledge layer's query is little more than its byte, so one subject
token cannot tell "Veltria" from "France" (both end in a letter Veltria's cue was keyed on):
the subject's gate opens on a chain of links over its last tokens, in order (links.py).
What is still open: once a taught subject's gate opens, its detectors' contest always opens
one of its facts, so another relation of that subject can answer a taught fact's word
(`test_another_relation_of_a_taught_subject_does_not_answer_its_facts`, xfail).
"""
import pytest
import torch

from model_worker.data import ByteTokenizer
from model_worker.generate import generate_fn
from model_worker.learn import LearnConfig, facts_from_lines, learn

SETS = {
    "veltria": {
        "facts": [("Veltria", [("The currency of {} is", "crown"), ("The capital of {} is", "river")]),
                  ("Osmark", [("The currency of {} is", "gold"), ("The capital of {} is", "stone")])],
        # questions learn was not asked about: another fictional subject, a real one, and another
        # relation of a taught subject on a phrasing whose subject context the model never saw
        # taught (the links do not hold there on this model: the relation channel is not what
        # keeps it clear, see the module's docstring)
        "others": ["The currency of Brenlo is", "The capital of Brenlo is", "The currency of France is",
                   "The language most spoken in Veltria is"]},
    "quenmoor": {
        "facts": [("Quenmoor", [("The river of {} is", "silver"), ("The founder of {} is", "tomas")]),
                  ("Ardessa", [("The river of {} is", "blue"), ("The founder of {} is", "lina")])],
        "others": ["The river of Pellin is", "The founder of Pellin is", "The river of Egypt is",
                   "The founder of Rome is"]},
}


def _facts_file(name: str) -> list[str]:
    return [f"{p.format(s)}\t{a}\t{s}" for s, facts in SETS[name]["facts"] for p, a in facts]


def _model(tmp, seed: int):
    """The tiny-knowledge preset (block size 128) over a fresh table under tmp, initialised with `seed`."""
    from model_worker.model import Transformer
    from model_worker.train import TrainConfig, create_table, model_config
    cfg = TrainConfig(model="tiny-knowledge", model_overrides={"block_size": 128}, out_dir=str(tmp))
    mcfg = model_config(cfg, 260)
    table = create_table(mcfg, cfg, str(tmp / "store"))
    torch.manual_seed(seed)
    return Transformer(mcfg, table), table


def _learn(tmp, name: str, seed: int, questions: list[str]) -> dict:
    """Teach set `name`'s facts file to a random model of `seed`; the answers to its facts and
    to `questions`, before and after."""
    model, table = _model(tmp, seed)
    tok = ByteTokenizer()
    facts = facts_from_lines(_facts_file(name))
    gen = generate_fn(model, tok)
    before = gen([f.prompt for f in facts] + questions, 8)
    learn(model, table, facts, tok, LearnConfig(steps=150, batch_size=4, lr=1.0), publish=False)
    after = gen([f.prompt for f in facts] + questions, 8)
    n = len(facts)
    return {"name": name, "facts": facts, "answers": {f.answer for f in facts}, "taught_before": before[:n],
            "taught_after": after[:n], "others_before": before[n:], "others_after": after[n:]}


@pytest.fixture(scope="module", params=[("veltria", 0), ("quenmoor", 1)], ids=["veltria-seed0", "quenmoor-seed1"])
def learned(request, tmp_path_factory):
    name, seed = request.param
    return _learn(tmp_path_factory.mktemp("user_facts"), name, seed, SETS[name]["others"])


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(".,") if words else ""


def _says_one_of(text: str, answers: set[str]) -> bool:
    """Whether `text` starts with one of `answers`' words, or one without its first letter
    (the tiny model often drops it: " crown" -> "rown")."""
    w = _first_word(text)
    return bool(w) and any(w == a or (len(a) > 3 and w == a[1:]) for a in answers)


def test_learn_makes_the_model_answer_a_new_fact_on_a_taught_phrasing(learned):
    right = [_first_word(p) == f.answer for f, p in zip(learned["facts"], learned["taught_after"])]
    assert not any(_first_word(p) == f.answer for f, p in zip(learned["facts"], learned["taught_before"]))
    # at this size the facts are only partly learnt: "The currency of Veltria is" -> " crown",
    # "... of Osmark is" -> " gold", the capitals " r" and "tone"
    assert sum(right) >= 2
    if learned["name"] == "veltria":
        assert right[0] and learned["taught_after"][0].startswith(" crown")


def test_learn_leaves_other_subjects_questions_alone(learned):
    """Before links, 3 of each set's 4 other questions answered a new fact ("The currency of
    France is" -> " crown", "The founder of Rome is" -> " tomas t"), and the fourth nearly
    ("The river of Egypt is" -> " bluuuuu")."""
    answers = learned["answers"]
    assert not any(_says_one_of(p, answers) for p in learned["others_before"])
    others = SETS[learned["name"]]["others"]
    leaked = [(q, p) for q, p in zip(others, learned["others_after"]) if _says_one_of(p, answers)]
    assert not leaked, f"{len(leaked)} of {len(others)} other questions answer a new fact: {leaked}"


@pytest.mark.xfail(strict=True, reason=(
    "another relation of a taught subject: where the subject's links hold (here 'of Quenmoor is', the context "
    "Quenmoor was taught in), its gate opens, and the contest of its facts' detectors always opens one of them "
    "(gating.family_winners has no floor; a floor at 0 changed nothing on the continual base), so 'The anthem of "
    "Quenmoor is' answers 'ilver' (silver, the river). On the continual base, holding one fact out per subject "
    "with several: 13 of 45 of its prompts answered a taught sibling's answer (CONTINUAL_NOTES, 2026-12-07)."))
def test_another_relation_of_a_taught_subject_does_not_answer_its_facts(tmp_path):
    out = _learn(tmp_path, "quenmoor", 2, ["The anthem of Quenmoor is"])
    assert not _says_one_of(out["others_before"][0], out["answers"])
    assert not _says_one_of(out["others_after"][0], out["answers"]), out["others_after"]
