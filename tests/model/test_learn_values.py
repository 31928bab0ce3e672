"""Values, not only types (issue 24, item 8): LoRA's merge, the AUC and the novelty probe
on cases whose answer is known."""
import pytest
import torch

from benchmarks.continual_eval import bootstrap, compare, split_keys
from benchmarks.continual_probes import auc, fit_probe
from model_worker.learn.baselines import LoRADelta, add_lora, lora_targets, merge_lora


def test_lora_merge_folds_exactly_w_plus_scale_a_b(tiny_knowledge):
    model, _ = tiny_knowledge()
    x = torch.randint(0, 256, (2, 16))
    base = {(id(m), n): getattr(m, n).detach().clone() for m, n in lora_targets(model)}
    add_lora(model, rank=2, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for mod, name in lora_targets(model):
        delta: LoRADelta = getattr(mod.parametrizations, name)[0]
        with torch.no_grad():
            delta.B.copy_(torch.randn(delta.B.shape, generator=g) * 0.05)   # a trained-looking adapter
        deltas[(id(mod), name)] = delta.scale * (delta.A @ delta.B).detach()
    with torch.no_grad():
        adapted = model(x)[0]
    merge_lora(model)
    for mod, name in lora_targets(model):
        key = (id(mod), name)
        torch.testing.assert_close(getattr(mod, name), base[key] + deltas[key])      # W + (alpha/r) A B
        assert not bool((deltas[key] == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], adapted, rtol=1e-4, atol=1e-5)      # same function after merging


def test_auc_on_a_case_counted_by_hand():
    # pairs (pos > neg): 0.1 -> 0, 0.4 -> 2, 0.35 -> 2, 0.8 -> 3, and 0.3 vs 0.3 ties count half
    pos = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.3])
    neg = torch.tensor([0.2, 0.3, 0.5])
    assert auc(pos, neg) == pytest.approx((0 + 2 + 2 + 3 + 1.5) / 15)
    g = torch.Generator().manual_seed(1)
    p, n = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(0, 5, (30,), generator=g).float()
    brute = sum(float(a > b) + 0.5 * float(a == b) for a in p for b in n) / (40 * 30)
    assert auc(p, n) == pytest.approx(brute)


def test_probe_separates_what_is_separable_and_not_what_is_not():
    g = torch.Generator().manual_seed(0)
    d = 8
    shift = torch.zeros(d)
    shift[3] = 3.0
    pos, neg = torch.randn(200, d, generator=g) + shift, torch.randn(200, d, generator=g)
    w = fit_probe(pos[:100], neg[:100])
    assert auc(pos[100:] @ w, neg[100:] @ w) > 0.95                 # held-out points of the same classes
    same = torch.randn(200, d, generator=g)
    w = fit_probe(same[:50], same[50:100])
    assert abs(auc(same[100:150] @ w, same[150:] @ w) - 0.5) < 0.15  # one distribution: chance


def test_split_halves_are_disjoint_fixed_and_cover_every_fact():
    class E:
        def __init__(self, s, r):
            self.subject, self.relation = s, r
    ex = [E(f"s{i}", r) for i in range(9) for r in ("a", "b")]
    tune, test = split_keys(ex, 24)
    assert not tune & test and len(tune | test) == 18 and len(tune) == 9
    assert (tune, test) == split_keys(ex, 24) and split_keys(ex, 25) != (tune, test)


def test_forgetting_counts_lost_and_gained_apart():
    class E:
        def __init__(self, i):
            self.subject, self.relation, self.prompt, self.answer = f"s{i}", "r", f"p{i}", f"a{i}"
    ex = [E(i) for i in range(4)]
    before = {"right": [True, True, False, False], "predictions": ["a0", "a1", "x", "y"]}
    after = {"right": [True, False, True, False], "predictions": ["a0", "crown", "a2", "y"]}
    c = compare(ex, before, after)
    assert (c["lost"], c["gained"], c["right_before"], c["right_after"]) == (1, 1, 2, 2)   # net 0, yet one lost
    assert c["lost_prompts"] == [{"subject": "s1", "relation": "r", "prompt": "p1", "answer": "a1", "now": "crown"}]
    assert c["lost_share"] == 0.5


def test_bootstrap_interval_holds_the_mean_and_is_zero_width_for_a_constant():
    b = bootstrap([1, 0, 1, 1, 0, 1, 0, 1])
    assert b["lo"] <= b["mean"] == 0.625 <= b["hi"] and b["hi"] - b["lo"] > 0.2
    c = bootstrap([1, 1, 1], [0, 0, 0])
    assert c["mean"] == c["lo"] == c["hi"] == 1.0


def test_replay_trains_on_the_old_text_too(tiny_knowledge):
    """full_finetune / lora with replay: each step adds the LM loss on one background batch,
    so the weights end elsewhere than without it; replay without old text is refused."""
    from model_worker.data import ByteTokenizer, PackedLoader
    from model_worker.learn import LearnConfig, TextFact, learn
    facts = [TextFact(f"The capital of {s} is", f" {a}.", a, "capital_of", s) for s, a in [("Xland", "Zorp"), ("Quux", "Blip")]]
    tok = ByteTokenizer()
    bg = [PackedLoader(["Old text about rivers and towns. " * 40], tok, 32, 2, seed=1).batch(i) for i in range(2)]
    out = {}
    for method in ("full_finetune", "lora"):
        for replay in (False, True):
            model, table = tiny_knowledge()
            learn(model, table, facts, tok, LearnConfig(method=method, steps=2, batch_size=2, replay=replay),
                  background=bg, publish=False)
            out[method, replay] = model.layers[0].attention.wqkv.weight.detach().clone()
        assert not torch.equal(out[method, False], out[method, True])
    model, table = tiny_knowledge()
    with pytest.raises(ValueError, match="replay needs"):
        learn(model, table, facts, tok, LearnConfig(method="lora", steps=1, replay=True), publish=False)
