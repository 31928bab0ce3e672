"""`learn` as a user runs it on a facts file (issue 24, items 7 and 8): fictional subjects,
several relations per subject, answers that are common words. Does the model answer a
taught fact afterwards, and do other subjects' questions stay clear of the new answers?

A tiny random model (conftest's tiny_knowledge, seed 0), no old text to calibrate on
(background=None: on a random or barely trained tiny model the calibration leaves the
new rows unread, so nothing would be learnt and the leak check would pass vacuously).
"""
import pytest
import torch

from model_worker.data import ByteTokenizer
from model_worker.generate import generate_fn
from model_worker.learn import LearnConfig, facts_from_lines, learn

FACTS_FILE = [f"{p.format(s)}\t{a}\t{s}" for s, facts in [
    ("Veltria", [("The currency of {} is", "crown"), ("The capital of {} is", "river")]),
    ("Osmark", [("The currency of {} is", "gold"), ("The capital of {} is", "stone")])] for p, a in facts]
NEW_ANSWERS = {"crown", "river", "gold", "stone"}
# questions learn was not asked about: another fictional subject, a real one, another relation of a taught subject
OTHERS = ["The currency of Brenlo is", "The capital of Brenlo is", "The currency of France is",
          "The language most spoken in Veltria is"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from model_worker.model import Transformer
    from model_worker.train import TrainConfig, create_table, model_config
    tmp = tmp_path_factory.mktemp("user_facts")
    cfg = TrainConfig(model="tiny-knowledge", model_overrides={"block_size": 128}, out_dir=str(tmp))
    mcfg = model_config(cfg, 260)
    table = create_table(mcfg, cfg, str(tmp / "store"))
    torch.manual_seed(0)
    model = Transformer(mcfg, table)
    tok = ByteTokenizer()
    facts = facts_from_lines(FACTS_FILE)
    gen = generate_fn(model, tok)
    before = gen([f.prompt for f in facts] + OTHERS, 8)
    learn(model, table, facts, tok, LearnConfig(steps=150, batch_size=4, lr=1.0), publish=False)
    after = gen([f.prompt for f in facts] + OTHERS, 8)
    n = len(facts)
    return {"facts": facts, "taught_before": before[:n], "taught_after": after[:n],
            "others_before": before[n:], "others_after": after[n:]}


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(".,") if words else ""


def test_learn_makes_the_model_answer_a_new_fact_on_a_taught_phrasing(learned):
    right = [_first_word(p) == f.answer for f, p in zip(learned["facts"], learned["taught_after"])]
    assert not any(_first_word(p) == f.answer for f, p in zip(learned["facts"], learned["taught_before"]))
    # "The currency of Veltria is" -> " crown"; at this size the other three are only partly learnt
    # (" s s s s", " crold"): 1 of 4 exactly right
    assert right[0] and learned["taught_after"][0].startswith(" crown")


@pytest.mark.xfail(strict=True, reason=(
    "new rows leak to other subjects: after learning Veltria's currency 'crown', 'The currency of Brenlo is', "
    "'The currency of France is' and 'The language most spoken in Veltria is' all answer 'crown' (3 of 4 other "
    "questions answer a new fact; none did before). The same failure as issue 24 item 7 on the continual base, "
    "where 6 of 78 old answers on held-out phrasings became 'crown'. Remove this mark when learn stops it."))
def test_learn_leaves_other_subjects_questions_alone(learned):
    assert not any(_first_word(p) in NEW_ANSWERS for p in learned["others_before"])
    leaked = [(q, p) for q, p in zip(OTHERS, learned["others_after"]) if _first_word(p) in NEW_ANSWERS]
    assert not leaked, f"{len(leaked)} of {len(OTHERS)} other questions answer a new fact: {leaked}"
