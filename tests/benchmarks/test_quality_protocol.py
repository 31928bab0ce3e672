"""benchmarks/quality_protocol.py (issue 24): the tuning / test split is by fact,
disjoint and deterministic; a family's variant is chosen from tuning-half metrics only;
the headline reports the test half with spreads and intervals."""
import pytest

from benchmarks.continual_eval import fact_key
from benchmarks.quality_protocol import VARIANTS, choose, difference, headline, merge_overrides, split_examples
from model_worker.data import build_corpus


@pytest.fixture(scope="module")
def corpus():
    return build_corpus("tiny")


def test_split_is_by_fact_disjoint_and_covers_every_prompt(corpus):
    halves = split_examples(corpus, 24)
    tune, test = halves["tune"], halves["test"]
    tune_facts = {fact_key(e) for e in tune["eval"]}
    test_facts = {fact_key(e) for e in test["eval"]}
    assert tune_facts and test_facts and not tune_facts & test_facts        # one fact, one side
    assert abs(len(tune["facts"]) - len(test["facts"])) <= 1
    assert len(tune["eval"]) + len(test["eval"]) == len(corpus.eval)
    assert sorted(e.prompt for e in tune["eval"] + test["eval"]) == sorted(corpus.eval_prompts)
    assert {fact_key(e) for e in test["seen"]} <= test_facts and {fact_key(e) for e in tune["seen"]} <= tune_facts
    assert test["texts"] == [e.text for e in test["eval"]]                 # held-out loss texts follow the prompts


def test_split_is_deterministic_and_moves_with_its_seed(corpus):
    a, b = split_examples(corpus, 24), split_examples(build_corpus("tiny"), 24)
    assert a["test"]["facts"] == b["test"]["facts"] and [e.prompt for e in a["test"]["eval"]] == \
        [e.prompt for e in b["test"]["eval"]]
    assert split_examples(corpus, 25)["test"]["facts"] != a["test"]["facts"]


def test_a_fact_with_several_held_out_phrasings_stays_on_one_side():
    from types import SimpleNamespace as E
    ev = [E(subject=s, relation=r, prompt=f"{s} {r} {i}", answer="x", text=f"{s} {r} {i} x")
          for s in "abcdefgh" for r in ("p", "q") for i in range(3)]
    halves = split_examples(E(eval=ev, eval_seen=[]), 7)
    for name in ("tune", "test"):
        keys = {fact_key(e) for e in halves[name]["eval"]}
        assert len(halves[name]["eval"]) == 3 * len(keys)                   # all 3 phrasings of each fact


def test_choose_ranks_by_tuning_recall_then_loss_then_order():
    assert choose({"a": [{"recall_heldout": 0.2, "heldout_loss": 1.0}],
                   "b": [{"recall_heldout": 0.3, "heldout_loss": 9.0}]}) == "b"
    # mean over tuning seeds
    assert choose({"a": [{"recall_heldout": 0.5, "heldout_loss": 1.0}, {"recall_heldout": 0.0, "heldout_loss": 1.0}],
                   "b": [{"recall_heldout": 0.3, "heldout_loss": 1.0}, {"recall_heldout": 0.3, "heldout_loss": 1.0}]}) == "b"
    assert choose({"a": [{"recall_heldout": 0.2, "heldout_loss": 2.0}],
                   "b": [{"recall_heldout": 0.2, "heldout_loss": 1.5}]}) == "b"
    assert choose({"a": [{"recall_heldout": 0.2, "heldout_loss": 2.0}],
                   "b": [{"recall_heldout": 0.2, "heldout_loss": 2.0}]}) == "a"


def test_the_tuning_record_chooses_from_tuning_runs_whatever_the_test_runs_say():
    """quality.tuning_record reads only the tuning jobs: a variant far better on the test
    half (runs that exist in the same jobs dict) is not chosen for it."""
    from benchmarks.quality import tuning_record
    fam = {"dense": VARIANTS["tiny"]["dense"]}
    a, b = (v.name for v in fam["dense"])
    run = lambda r: {"recall_heldout": r, "heldout_loss": 1.0, "params": {"active": 1}}   # noqa: E731
    jobs = {f"tune/{a}/100": run(0.4), f"tune/{b}/100": run(0.1),
            f"test/{a}/0": run(0.0), f"test/{b}/0": run(0.9)}
    t = tuning_record(fam, jobs, [100])["dense"]
    assert t["winner"] == a and t["trials"] == 2
    assert [x["tune_recall_heldout"] for x in t["tried"]] == [0.4, 0.1]


def test_every_family_gets_the_same_number_of_variants():
    for size, fams in VARIANTS.items():
        assert len({len(vs) for vs in fams.values()}) == 1, size
        assert all(v.family == f for f, vs in fams.items() for v in vs)


def test_merge_overrides_merges_the_knowledge_fields():
    assert merge_overrides({"knowledge": {"n_sub": 128, "k": 16}, "d_ff": 1}, {"knowledge": {"layers": [0, 1]}}) == \
        {"knowledge": {"n_sub": 128, "k": 16, "layers": [0, 1]}, "d_ff": 1}


def _run(seed, recall, right, loss=2.0):
    return {"seed": seed, "recall_heldout": recall, "right": right, "heldout_loss": loss, "recall_seen": 0.5,
            "variant": {"name": "v"}, "params": {"active": 10, "total": 20}, "tokens": 100}


def test_difference_pairs_by_seed_and_bootstraps_over_facts():
    # 2 facts: prompts 0, 1 -> fact 0; prompt 2 -> fact 1
    test = {"knowledge": [_run(0, 2 / 3, [1, 1, 0]), _run(1, 1 / 3, [0, 0, 1])],
            "dense": [_run(0, 1 / 3, [1, 0, 0]), _run(1, 1 / 3, [0, 0, 1])]}
    d = difference(test, "knowledge", "dense", [0, 0, 1], 2)
    assert d["paired_by_seed"]["per_seed"] == {0: pytest.approx(1 / 3), 1: 0.0}
    assert d["paired_by_seed"]["mean"] == pytest.approx(1 / 6) and d["paired_by_seed"]["se"] == pytest.approx(1 / 6)
    b = d["bootstrap_over_test_facts"]
    assert b["n"] == 2 and b["mean"] == pytest.approx((0.25 + 0.0) / 2) and b["lo"] <= b["mean"] <= b["hi"]


def test_headline_reports_test_spreads_and_the_best_baseline():
    tuning = {f: {"trials": 2, "winner": "v"} for f in ("dense", "moe", "knowledge")}
    test = {"dense": [_run(s, r, [1]) for s, r in ((0, 0.1), (1, 0.2), (2, 0.3))],
            "moe": [_run(s, r, [1]) for s, r in ((0, 0.3), (1, 0.2), (2, 0.4))],
            "knowledge": [_run(s, r, [1]) for s, r in ((0, 0.5), (1, 0.1), (2, 0.6))]}
    split = {"split_seed": 24, "tune_facts": 1, "tune_prompts": 1, "test_facts": 1, "test_prompts": 1,
             "test_fact_of_prompt": [0]}
    h = headline(tuning, test, split, [0, 1, 2], [100], "tiny", 5)
    r = h["test"]["moe"]["recall_heldout"]
    assert (r["median"], r["min"], r["max"]) == (0.3, 0.2, 0.4) and r["mean"] == pytest.approx(0.3)
    assert h["best_baseline"] == "moe" and h["knowledge_minus_best_baseline"]["baseline"] == "moe"
    assert h["knowledge_minus_best_baseline"]["paired_by_seed"]["mean"] == pytest.approx(0.1)
    assert set(h["knowledge_minus"]) == {"dense", "moe"} and h["tuning_trials_per_family"] == {
        "dense": 2, "moe": 2, "knowledge": 2}
