"""Continual learning: `learn` with new rows leaves the model and every old row
bitwise unchanged, publishes a version, and the baselines run; versions written before
detectors had their own partition are migrated."""
import os

import pytest
import torch

from benchmarks.continual_probes import auc, novelty_probe
from model_worker.data import ByteTokenizer, collate_examples
from model_worker import interpret as I
from model_worker.checkpoint import load_for_inference
from model_worker.gating import DETECTOR_PARTITION
from model_worker.generate import generate_fn
from model_worker.learn import METHODS, LearnConfig, LearnMethod, TextFact, facts_from_lines, learn, register
from model_worker.learn.baselines import add_lora, merge_lora
from model_worker.learn.keys import init_new_keys
from model_worker.learn.migrate import main as migrate_main
from model_worker.learn.migrate import needs_migration
from model_worker.learn.plan import fact_detectors
from model_worker.learn.queries import background_queries, collect_queries, group_batches, subject_positions
from model_worker.learn.steps import train_steps
from store_service import persistence
from store_service.table import Table
from store_service.testing import served_table

FACTS = [TextFact(f"The capital of {s} is", f" {a}.", a, "capital_of", s)
         for s, a in [("Xland", "Zorp"), ("Quux", "Blip"), ("Vorn", "Tesk"), ("Mure", "Ald")]]


@pytest.fixture
def make(tiny_knowledge):
    def build(tmp_path, **kw):
        return tiny_knowledge(**kw)
    return build


def shard_state(table):
    return {k: v.clone() for k, v in table.shards[0].state_dict().items()}


def test_learn_new_rows_changes_nothing_old_bitwise(tmp_path, make):
    model, table = make(tmp_path)
    n_old = table.info().num_rows
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = shard_state(table)
    res = learn(model, table, FACTS, ByteTokenizer(), LearnConfig(steps=4, batch_size=4, lr=1e-2, key_lr=1e-3))

    after = model.state_dict()
    assert params.keys() == after.keys()
    for k in params:  # every weight and persistent buffer, bitwise
        assert torch.equal(params[k], after[k]), k
    assert not any(p.requires_grad for p in model.parameters())
    now = shard_state(table)
    for name in ("values", "opt_m", "opt_v", "opt_steps", "frozen", "ablated"):
        assert torch.equal(before[name], now[name][:n_old]), name
    # new rows exist, were trained (values moved from their init), and were published
    assert res.new_ids is not None and res.new_ids.min() == n_old and res.new_ids.numel() > 0
    assert table.info().num_rows == n_old + res.new_ids.numel()
    assert int(now["opt_steps"][n_old:].sum()) > 0
    assert res.version is not None
    reopened = Table.open(str(tmp_path / "store"), res.version)
    again = {k: v for k, v in reopened.shards[0].state_dict().items()}
    assert torch.equal(again["values"][:n_old], before["values"])
    assert torch.equal(again["values"][n_old:], now["values"][n_old:])
    assert torch.equal(again["keys"], now["keys"])


def test_new_rows_learn_the_facts(tmp_path, make):
    model, table = make(tmp_path)
    res = learn(model, table, FACTS, ByteTokenizer(),
                  LearnConfig(steps=30, batch_size=4, lr=3e-2, key_margin=2.0), publish=False)
    # a random model passes little through its knowledge layer (small W_o, gate): a clear drop is enough
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5 - 0.05


def test_sparse_memory_updates_only_top_t_rows_and_no_weights(tmp_path, make):
    model, table = make(tmp_path)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = shard_state(table)["values"]
    res = learn(model, table, FACTS, ByteTokenizer(),
                  LearnConfig(method="sparse_memory", steps=3, batch_size=4, top_t=5), background=[], publish=False)
    changed = (shard_state(table)["values"] != before).any(1)
    assert 0 < int(changed.sum()) <= 3 * 5 and int(changed.sum()) <= res.info["rows_updated"]
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert not bool(table.usage().frozen.any())  # freeze flags restored


def test_lora_starts_equal_and_merges(tmp_path, make):
    model, table = make(tmp_path)
    x = torch.randint(0, 256, (2, 16))
    ref = model(x)[0]
    params = add_lora(model, rank=2)
    assert len(params) > 0
    torch.testing.assert_close(model(x)[0], ref)
    merge_lora(model)
    assert not any("parametrizations" in k for k in model.state_dict())


def test_full_finetune_and_lora_change_weights_not_rows_for_lora(tmp_path, make):
    model, table = make(tmp_path)
    before = shard_state(table)["values"]
    w0 = model.layers[0].attention.wqkv.weight.clone()
    learn(model, table, FACTS, ByteTokenizer(), LearnConfig(method="lora", steps=2, batch_size=4), publish=False)
    assert not torch.equal(model.layers[0].attention.wqkv.weight, w0)
    assert torch.equal(shard_state(table)["values"], before)
    learn(model, table, FACTS, ByteTokenizer(), LearnConfig(method="full_finetune", steps=2, batch_size=4),
            publish=False)
    assert not torch.equal(shard_state(table)["values"], before)


def test_facts_from_lines():
    f = facts_from_lines(["The capital of Xland is\tZorp", "Zorp is a city.", "",
                            "Xland's currency is the\tFlorp\tXland"])
    assert f[0].prompt == "The capital of Xland is" and f[0].completion == " Zorp" and f[0].answer == "Zorp"
    assert f[0].subject == "The capital of Xland is"         # no subject column: the prompt is the subject
    assert f[1].prompt == "" and f[1].completion == "Zorp is a city."
    assert f[2].answer == "Florp" and f[2].subject == "Xland"
    assert f[2].relation == "Florp"                          # same subject and answer: one fact's phrasings


def test_calibrated_keys_are_not_selected_by_old_queries(tmp_path, make):
    model, table = make(tmp_path)
    tok = ByteTokenizer()
    old = ["The capital of France is Paris.", "Berlin is the capital of Germany.", "Rome lies in Italy."]
    bg = [collate_examples([TextFact("", t) for t in old], tok, answer_only=False)]
    bgq = background_queries(model, bg)
    batches, groups = group_batches(FACTS, tok, 4)
    keys, info = init_new_keys(model, collect_queries(model, batches, groups), 1.0, background=bgq)
    kl = model.knowledge_layers()[0]
    q = bgq[1].reshape(-1, kl.d_k)
    kth = kl.product_scores(q, kl.k)[:, -1]
    assert bool(((q @ keys.T).max(1).values < kth).all())   # no old query would pick a new row
    assert keys.shape[0] == info["layer1"]["groups"] * kl.n_heads


@pytest.mark.parametrize("whiten", [0.0, 0.5], ids=["mean-difference", "whitened"])
def test_select_bias_keys_are_not_selected_by_old_queries(tmp_path, whiten, make):
    model, table = make(tmp_path)
    tok = ByteTokenizer()
    old = ["The capital of France is Paris.", "Berlin is the capital of Germany.", "Rome lies in Italy."]
    bg = [collate_examples([TextFact("", t) for t in old], tok, answer_only=False)]
    bgq = background_queries(model, bg)
    queries = collect_queries(model, *group_batches(FACTS, tok, 4))
    keys, info = init_new_keys(model, queries, 3.0, background=bgq, select_bias=True, whiten=whiten)
    bias = info.pop("bias")
    kl = model.knowledge_layers()[0]
    q = bgq[1].reshape(-1, kl.d_k)
    kth = kl.product_scores(q, kl.k)[:, -1]
    assert bias.shape == (keys.shape[0],)
    assert bool(((q @ keys.T + bias).max(1).values < kth).all())   # the bias keeps old queries off the rows
    # the keys themselves are large: their own queries score above the best product row
    own = queries[1][0].reshape(-1, kl.d_k)
    assert float((own @ keys.T).max(1).values.mean()) > float(kl.product_scores(own, 1).mean())
    # the table keeps the bias: a search sees it
    n_old = table.info().num_rows
    ids = table.add_rows(torch.zeros(keys.shape[0], table.info().d_v), keys, bias)
    assert ids.min() == n_old
    assert torch.equal(table.shards[0].state_dict()["flat_bias"][-keys.shape[0]:], bias)


def test_subject_positions():
    tok = ByteTokenizer()
    facts = [TextFact("The capital of Xland is", " Zorp.", "Zorp", "capital_of", "Xland"),
             TextFact("Xland has the capital", " Zorp.", "Zorp", "capital_of", "Xland")]
    batches, groups, at = subject_positions(facts, tok, 2, 4)
    mask, label = at[0]
    inputs = batches[0].inputs
    assert groups[0][0] == groups[0][1] < 0                      # one group per subject, never an answer group
    for row, e in enumerate(facts):
        pos = mask[row].nonzero()[:, 0]
        assert bytes(inputs[row, pos].tolist()) == b"nd"         # the subject's last two bytes
        assert label[row, pos].tolist() == [1, 0]


def test_learn_new_rows_with_subject_rows_and_bias_changes_nothing_old(tmp_path, make):
    model, table = make(tmp_path)
    n_old = table.info().num_rows
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = shard_state(table)
    bg = [collate_examples([TextFact("", "The capital of France is Paris.")], ByteTokenizer(), answer_only=False)]
    res = learn(model, table, FACTS, ByteTokenizer(),
                  LearnConfig(steps=4, batch_size=4, lr=1e-2, select_bias=True, subject_rows=2, fact_rows=True),
                  background=bg, publish=False)
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    now = shard_state(table)
    for name in ("values", "opt_m", "opt_v", "opt_steps", "frozen", "ablated"):
        assert torch.equal(before[name], now[name][:n_old]), name
    assert torch.equal(before["flat_bias"], now["flat_bias"][:before["flat_bias"].shape[0]])
    assert res.new_ids.numel() == now["flat_bias"].shape[0] - before["flat_bias"].shape[0]
    assert bool((now["flat_bias"][-res.new_ids.numel():] != 0).any())


@pytest.mark.parametrize("gate_on_subject", [True, False])
def test_learn_gates_each_fact_on_its_subject(tmp_path, gate_on_subject, make):
    model, table = make(tmp_path)
    n_old = table.info().num_rows
    res = learn(model, table, FACTS, ByteTokenizer(),
                  LearnConfig(steps=2, batch_size=4, gate_on_subject=gate_on_subject), publish=False)
    st = shard_state(table)
    ids = st["flat_ids"]
    unset = torch.full_like(ids, -1)                          # a tag no row was given is not stored
    cue, gate, after = st.get("tag_cue", unset), st.get("tag_gate", unset), st.get("tag_after", unset)
    new = ids >= n_old
    assert int(new.sum()) == res.new_ids.numel()
    if not gate_on_subject:
        assert bool((cue == -1).all() and (gate == -1).all()) and table.info().tag_rows.get("gate", 0) == 0
        return
    link = (cue >= 0) & (gate < 0)
    assert res.info["link_rows"] == int(link.sum()) > 0 and res.info["cue_rows"] == 0
    assert table.info().partition_rows[DETECTOR_PARTITION] == res.info["link_rows"]   # no subject has two facts
    assert res.info["gated_rows"] == int((gate >= 0).sum()) == table.info().tag_rows["gate"] > 0
    assert not bool(((cue >= 0) & (gate >= 0)).any())        # a link is never gated
    # one label per (subject, token, knowledge layer): the id of its first link row; each label
    # after the one of the token before it, so each subject's links form one chain
    labels = set(cue[link].tolist())
    for label in labels:
        assert int(cue[ids == label]) == label
        assert len(set(after[cue == label].tolist())) == 1
    ends = labels - set(after[link].tolist())                 # no link comes after a chain's last one
    starts = set(cue[link & (after < 0)].tolist())
    assert len(ends) == len(starts) == len({f.subject for f in FACTS}) * len(model.knowledge_layers())
    for end in ends:                                          # back from the end to the start: 3 tokens
        chain, label = [end], end
        while (a := int(after[cue == label][0])) >= 0:
            chain.append(label := a)
        assert label in starts and len(chain) == LearnConfig().subject_rows
    assert set(gate[gate >= 0].tolist()) == ends              # every subject's answers are gated on its chain's end
    assert bool((st["flat_bias"][gate >= 0] == 0).all())
    assert bool(st["frozen"][ids[link]].all()) and bool((st["values"][ids[link]] == 0).all())   # never read


def test_learn_with_subject_rows_gates_each_fact_on_its_subject_rows(tmp_path, make):
    """subject_links=False: the subject rows (read, trained) are the cue of their subject's answers."""
    model, table = make(tmp_path)
    learn(model, table, FACTS, ByteTokenizer(), LearnConfig(steps=2, batch_size=4, subject_links=False),
          publish=False)
    st = shard_state(table)
    ids = st["flat_ids"]
    cue, gate = st["tag_cue"], st["tag_gate"]
    assert "tag_after" not in st and not table.info().partition_rows.get(DETECTOR_PARTITION)
    labels = set(cue[cue >= 0].tolist())
    # one label per (subject, knowledge layer): the id of that subject's first cue row
    assert len(labels) == len({f.subject for f in FACTS}) * len(model.knowledge_layers())
    for label in labels:
        assert int(cue[ids == label]) == label
    assert set(gate[gate >= 0].tolist()) == labels          # every subject's answers are gated on it
    assert not bool(((cue >= 0) & (gate >= 0)).any())        # a cue row is never gated
    assert bool((st["flat_bias"][gate >= 0] == 0).all())


def test_gated_key_norm_max_gives_every_gated_key_one_norm(tmp_path, make):
    model, table = make(tmp_path)
    learn(model, table, FACTS, ByteTokenizer(), LearnConfig(steps=1, batch_size=4, gated_key_norm="max"),
            publish=False)
    st = shard_state(table)
    norms = st["keys"][st["tag_gate"] >= 0].norm(dim=-1)
    torch.testing.assert_close(norms, norms.max().expand_as(norms))
    with pytest.raises(ValueError, match="gated_key_norm"):
        LearnConfig(gated_key_norm="mean")


@pytest.mark.parametrize("subject_links", [True, False])
def test_key_lr_trains_gated_keys_and_leaves_the_cues_where_they_were_made(tmp_path, subject_links, make):
    model, table = make(tmp_path)
    n_old = table.info().num_rows
    orig = table.add_rows

    made = {}

    def add_rows(values, keys, bias=None, *, tags=None, partition=0):       # what learn made, before training
        made.update(keys=keys.clone(), **tags)
        return orig(values, keys, bias, tags=tags, partition=partition)
    table.add_rows = add_rows
    learn(model, table, FACTS, ByteTokenizer(), LearnConfig(steps=4, batch_size=4, key_lr=0.05,
                                                            subject_links=subject_links), publish=False)
    st = shard_state(table)
    new = st["flat_ids"] >= n_old
    keys, cue, gate = st["keys"][new], made["cue"], made["gate"]
    assert torch.equal(keys[cue >= 0], made["keys"][cue >= 0])            # cues bitwise as made
    assert not torch.equal(keys[gate >= 0], made["keys"][gate >= 0])      # gated keys trained
    # nothing but the links (never read) stays frozen; subject rows are trainable again
    frozen = (cue >= 0) & (gate < 0) if subject_links else torch.zeros_like(cue, dtype=torch.bool)
    assert torch.equal(st["frozen"][n_old:], frozen) and bool(frozen.any()) == subject_links


def test_auc_and_novelty_probe(tmp_path, make):
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5          # ties count half
    model, table = make(tmp_path)
    tok = ByteTokenizer()
    old = [TextFact(f"The capital of {s} is", f" {a}.", a, "capital_of", s)
           for s, a in [("Plin", "Gorm"), ("Dask", "Ulo"), ("Frey", "Oma")]]
    bg = [collate_examples([TextFact("", t) for t in ["Rome lies in Italy.", "The capital of Plin is Gorm."]],
                           tok, answer_only=False)]
    out = novelty_probe(model, tok, FACTS[:3], FACTS[3:], old, background_queries(model, bg))
    assert set(out) == {"layer1_first_char", "layer1_subject"}
    for v in out.values():
        assert 0.0 <= v["auc_new_vs_old_heldout"] <= 1.0 and v["new_heldout"] == 1 and v["old_heldout"] == 3


# Xland has three facts (two phrasings each), Quux one.
SIBLINGS = [TextFact(p.format(s), f" {a}.", a, r, s) for s, r, a, phrasings in [
    ("Xland", "capital_of", "Zorp", ("The capital of {} is", "{}'s capital city is")),
    ("Xland", "continent_of", "Mu", ("{} lies on the continent of", "The continent of {} is")),
    ("Xland", "currency_of", "Florp", ("In {} people pay with", "The currency of {} is")),
    ("Quux", "capital_of", "Blip", ("The capital of {} is", "{}'s capital city is"))] for p in phrasings]


def test_fact_detectors_score_at_most_zero_on_every_sibling_query():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 8, generator=g)                      # 12 positions, 2 heads
    fact = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])   # facts 0 and 1: subject "a"; fact 2: "b"
    found = fact_detectors({3: (q, torch.stack([fact, torch.arange(12)], 1))}, ["a", "a", "b"], prune=0.95)
    keys, bias, f, pos = found[3]
    assert set(f.tolist()) <= {0, 1} and 0 < keys.shape[0] <= 16     # fact 2 has no sibling: no detector
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(keys.shape[0]))
    u = torch.nn.functional.normalize(q, dim=-1)
    for key, b, ff, p in zip(keys, bias, f.tolist(), pos.tolist()):
        sib = u[fact == 1 - ff].reshape(-1, 8)
        assert float((sib @ key).max() + b) == pytest.approx(0.0, abs=1e-5)   # the tie with the closest sibling
        assert float((u[p] @ key).max() + b) > 0                             # its own query clears it
        assert -float(b) < 0.95


def test_learn_tells_a_subjects_facts_apart_with_detectors(tmp_path, make):
    model, table = make(tmp_path)
    n_old = table.info().num_rows
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = shard_state(table)
    made = {}
    orig = table.add_rows

    def add_rows(values, keys, bias=None, *, tags=None, partition=0):
        made.update(values=values.clone(), keys=keys.clone(), partition=partition.clone(), **tags)
        return orig(values, keys, bias, tags=tags, partition=partition)
    table.add_rows = add_rows
    res = learn(model, table, SIBLINGS, ByteTokenizer(), LearnConfig(steps=4, batch_size=4, lr=1e-2),
                  publish=False)
    cue, gate, after = made["cue"], made["gate"], made["after"]
    detector, link = (cue >= 0) & (gate >= 0), (cue >= 0) & (gate < 0)
    assert res.info["detector_rows"] == int(detector.sum()) > 0 and res.info["link_rows"] == int(link.sum()) > 0
    assert table.info().partition_rows[DETECTOR_PARTITION] == int((detector | link).sum())
    assert torch.equal(made["partition"], torch.where(detector | link, DETECTOR_PARTITION, 0))   # out of the top-k
    ids = res.new_ids
    subject_label = set(cue[link].tolist()) - set(after[link].tolist())       # one chain's end per subject
    assert len(subject_label) == 2
    # Xland's three facts: each has detectors under Xland's cue label, and its answer rows open on them
    fact_labels = set(cue[detector].tolist())
    assert len(fact_labels) == 3 and len(set(gate[detector].tolist())) == 1
    assert set(gate[detector].tolist()) <= subject_label
    answer_gates = set(gate[(gate >= 0) & (cue < 0)].tolist())
    assert fact_labels <= answer_gates and len(answer_gates - fact_labels) == 1   # + Quux's, on its subject
    assert (answer_gates - fact_labels) <= subject_label
    # detectors: never read, frozen, their values (zero) and keys untouched; old rows bitwise as they were
    st = shard_state(table)
    new = st["flat_ids"] >= n_old
    detector |= link                                                        # links are detectors too
    assert bool(st["frozen"][ids[detector]].all()) and not bool(st["frozen"][ids[~detector]].any())
    assert bool((st["values"][ids[detector]] == 0).all())
    assert torch.equal(st["keys"][new][detector], made["keys"][detector])
    assert int(table.usage().hits[ids[detector]].sum()) == 0
    for name in ("values", "opt_m", "opt_v", "opt_steps", "frozen", "ablated"):
        assert torch.equal(before[name], st[name][:n_old]), name
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())


def _learned_siblings(make, tmp_path, **kw):
    """A tiny model that learned SIBLINGS (detectors and all), its logits on their texts and
    its answers to their prompts: what other ways of serving the same rows must reproduce."""
    model, table = make(tmp_path, **kw)
    tok = ByteTokenizer()
    res = learn(model, table, SIBLINGS, tok, LearnConfig(steps=6, batch_size=4, lr=3e-2))
    assert table.info().partition_rows[DETECTOR_PARTITION] > 0
    x = torch.tensor([tok.encode(e.text, bos=True)[:24] for e in SIBLINGS[::2]])
    with torch.no_grad():
        logits = model(x)[0]

    def answers():
        return generate_fn(model, tok)([e.prompt for e in SIBLINGS], 6)
    return model, res, x, logits, answers, answers()


def test_learned_detectors_answer_the_same_over_grpc(tmp_path, make):
    """A learned table with detectors, served by 2 loopback shard servers, gives the model the
    in-process table's logits (generation included: the gate state carries the same way)."""
    model, res, x, local, answers, local_gen = _learned_siblings(make, tmp_path, num_shards=2)
    root = str(tmp_path / "store")
    with served_table(root, res.version, timeout_s=20) as remote:
        model.attach_table(remote)
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0], local, rtol=1e-5, atol=1e-5)
        assert answers() == local_gen


def test_explain_names_the_fact_whose_detectors_won(tmp_path, make):
    model, table = make(tmp_path)
    tok = ByteTokenizer()
    res = learn(model, table, SIBLINGS, tok, LearnConfig(steps=2, batch_size=4), publish=False)
    names = res.info["labels"]
    assert {"subject Xland", "subject Quux", "Xland -> Zorp", "Xland -> Mu", "Xland -> Florp"} <= set(names.values())
    e = I.explain(model, tok, "The capital of Xland is", max_new_tokens=2, labels=names)
    last = e["layers"][1][len(tok.encode("The capital of Xland is", bos=True)) - 1]   # predicts the answer
    opened = {g.get("name") for g in last["gates"]}
    # a taught phrasing: its own fact's detectors score above the tie, its siblings' at most at it
    assert "subject Xland" in opened and "Xland -> Zorp" in opened
    assert not opened & {"Xland -> Mu", "Xland -> Florp"}
    assert [g for g in last["gates"] if g.get("name") == "Xland -> Zorp"][0]["evidence"] > 0
    assert "open: " in I.format_explanation(e) and "Xland -> Zorp (evidence +" in I.format_explanation(e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_worker_reads_learned_detectors_as_the_cpu_worker(tmp_path, make):
    """Rows learned on the CPU, served to the model on the GPU: the gates and the detector
    evidence computed on the device give the CPU's logits and answers."""
    model, _, x, cpu, answers, cpu_answers = _learned_siblings(make, tmp_path)
    model.cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(x.cuda())[0].cpu(), cpu, rtol=1e-4, atol=1e-4)
    assert answers() == cpu_answers


def test_learn_runs_the_method_registered_under_the_configs_name(tmp_path, make):
    model, table = make(tmp_path)
    n_old = table.info().num_rows
    seen = {}

    def just_steps(run):
        seen.update(lr=run.lr, old_rows=run.old_ids.numel(), steps=run.cfg.steps)
        run.table.set_frozen(run.old_ids, True)        # learn restores the old rows' flags
        run.result.losses = train_steps(run.model, run.table, run.loader, run.cfg, [], run.lr)

    assert list(METHODS) == ["new_rows", "sparse_memory", "full_finetune", "lora"]
    register(LearnMethod("just_steps", default_lr=0.5, run=just_steps))
    try:
        res = learn(model, table, FACTS, ByteTokenizer(), LearnConfig(method="just_steps", steps=2, batch_size=4),
                    publish=False)
    finally:
        del METHODS["just_steps"]
    assert seen == {"lr": 0.5, "old_rows": n_old, "steps": 2}
    assert res.method == "just_steps" and len(res.losses) == 2
    assert not bool(table.usage().frozen.any())
    with pytest.raises(ValueError, match="method must be one of"):
        learn(model, table, FACTS, ByteTokenizer(), LearnConfig(method="just_steps"))


def test_migrate_moves_the_detectors_of_a_format1_version_to_their_partition(legacy_v1, capsys):
    """tests/data/legacy_v1's store version 2, written by the pre-restructure code (format 1,
    flat_cue / flat_gate arrays, detectors among the rows): today's store reads every row of
    it in partition 0; the migration rewrites it in place with the detectors in partition 1
    and nothing else changed, and says so on a second run."""
    root, expected = str(legacy_v1 / "store"), torch.load(legacy_v1 / "expected.pt", weights_only=False)
    vdir = persistence.version_path(root, 2)
    before = persistence.read_shard(vdir, 0)
    assert persistence.shard_format(vdir, 0) == 1 and needs_migration(root, 2)
    assert Table.open(root, 2).info().partition_rows == {}
    migrate_main([root, "--version", "2"])
    assert capsys.readouterr().out == "version 2: migrated\n"
    after = persistence.read_shard(vdir, 0)
    assert persistence.shard_format(vdir, 0) == 2 and not needs_migration(root, 2)
    detector = (after.arrays["tag_cue"] >= 0) & (after.arrays["tag_gate"] >= 0)
    assert after.arrays["flat_partition"].tolist() == [DETECTOR_PARTITION if d else 0 for d in detector]
    assert before.arrays.keys() == after.arrays.keys()
    for name, arr in before.arrays.items():
        if name != "flat_partition":
            assert (arr == after.arrays[name]).all(), name
    info = Table.open(root, 2).info()
    assert info.partition_rows == {DETECTOR_PARTITION: expected["detector_rows"]}
    assert info.tag_rows["gate"] == expected["gated_rows"] and info.num_rows == expected["num_rows"]
    assert os.listdir(os.path.join(root, "staging")) == []                        # nothing left behind
    migrate_main([root])
    assert capsys.readouterr().out == "version 2: nothing to do\n"
    with pytest.raises(SystemExit, match="migrate: no published versions"):
        migrate_main([str(legacy_v1 / "nothing_here")])


def test_a_format1_checkpoint_is_migrated_when_loaded_and_answers_as_before(legacy_v1):
    """Loading the pre-restructure learned checkpoint migrates its store version on the way
    and gives that code's logits (to float rounding: the fixture was written on an Intel host,
    whose BLAS kernels round differently from an AMD one's) and its answers."""
    expected = torch.load(legacy_v1 / "expected.pt", weights_only=False)
    model, tok, meta = load_for_inference(legacy_v1 / "checkpoint")
    assert not needs_migration(meta["store_root"], meta["table_version"])
    assert model.tables()[0].info().partition_rows == {DETECTOR_PARTITION: expected["detector_rows"]}
    with torch.no_grad():
        torch.testing.assert_close(model(expected["inputs"])[0], expected["logits"], rtol=1e-4, atol=1e-4)
    assert generate_fn(model, tok)(expected["prompts"], 6) == expected["answers"]
