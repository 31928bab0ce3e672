"""The transformer: shapes for every baseline, KV-cache decoding equals the
full forward, parameter accounting, end-of-step balancing hooks."""
from __future__ import annotations

import threading

import pytest
import torch

from model_worker.config import configs, preset
from model_worker.data import ByteTokenizer
from model_worker.generate import answer, generate, sample_next
from model_worker.model import Transformer


@pytest.fixture
def build(tensor_table):
    """build(preset name, **overrides) -> a Transformer (seed 0) over a TensorTable with 7 flat rows."""
    def make(name: str, **overrides) -> Transformer:
        torch.manual_seed(0)
        cfg = preset(name, **overrides)
        table = None
        if cfg.knowledge is not None:
            kn = cfg.knowledge
            table = tensor_table(kn.d_k, kn.d_v, kn.n_sub, n_flat=7)
        return Transformer(cfg, table)
    return make


@pytest.mark.parametrize("name", [n for n in configs if n.startswith("tiny")])
def test_shapes_and_backward(name, build):
    model = build(name)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 11))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 11, model.cfg.vocab_size) and logits.dtype == torch.float32
    (loss + model.aux_loss()).backward()
    assert model.tok_embeddings.weight.grad is not None
    counts = model.count_params()
    assert 0 < counts["active"] <= counts["total"]


@pytest.mark.parametrize("name,placement", [("tiny-dense", None), ("tiny-moe", None),
                                            ("tiny-knowledge", "replace"), ("tiny-knowledge", "beside")])
def test_kv_cache_decoding_equals_full_forward(name, placement, build):
    kw = {}
    if placement:
        kw["knowledge"] = dict(configs[name]["knowledge"], placement=placement)
    model = build(name, **kw).eval()
    B, S, P = 2, 12, 5
    idx = torch.randint(0, model.cfg.vocab_size, (B, S))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_caches(B, 32)
        steps = [model(idx[:, :P], input_pos=torch.arange(P))[0]]          # prefill
        for t in range(P, S):                                              # decode one token at a time
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0])
        model.clear_caches()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_knowledge_placement(build):
    m = build("tiny-knowledge")
    kl = m.cfg.knowledge.layers
    assert all((b.knowledge is not None) == (i in kl) for i, b in enumerate(m.layers))
    assert all(m.layers[i].ffn is None for i in kl)  # "replace"
    m2 = build("tiny-knowledge", knowledge=dict(configs["tiny-knowledge"]["knowledge"], placement="beside"))
    assert all(m2.layers[i].ffn is not None for i in kl)


def test_end_step_moves_biases(build):
    model = build("tiny-knowledge").train()
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)[1].backward()
    loads = model.end_step()
    assert loads and all(l.sum() == 2 * 16 * model.cfg.n_active for l in loads.values())
    assert any(m.router.expert_bias.abs().sum() > 0 for m in model.moe_layers())
    assert any(k.bias_a.abs().sum() > 0 for k in model.knowledge_layers())


def test_requires_table_for_knowledge():
    with pytest.raises(ValueError):
        Transformer(preset("tiny-knowledge"))


def test_generate_greedy_matches_full_forward_and_records_rows(build):
    model = build("tiny-knowledge").eval()
    prompt = torch.randint(0, 256, (2, 6))
    gen = generate(model, prompt, 5, record=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):                       # the slow way: full forward over the whole sequence
            nxt = model(seq)[0][:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(gen.tokens, seq[:, 6:])
    (layer, (ids, w)), = gen.rows.items()
    kn = model.cfg.knowledge
    assert layer in kn.layers and ids.shape == w.shape == (2, 6 + 4, kn.n_heads, kn.k)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 10, kn.n_heads))
    out = answer(model, ByteTokenizer(), ["ab", "cd", "xyz"], max_new_tokens=3)
    assert len(out) == 3
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.9, -10.0]])
    picks = {int(sample_next(logits, 1.0, 0.9, g)) for _ in range(50)}
    assert picks <= {1, 2} and len(picks) == 2  # top-p keeps the two likely tokens only


def test_fetch_is_in_flight_while_the_ffn_beside_it_runs(build):
    """With the knowledge layer beside the FFN, a fetch-mode readout's fetch is answered
    while the FFN computes: here the fetch cannot answer until the FFN has started (it
    would deadlock if the block fetched first and then ran the FFN), and the output equals
    pushdown's."""
    kn = {**configs["tiny-knowledge"]["knowledge"], "placement": "beside", "readout": "fetch"}
    model = build("tiny-knowledge", knowledge=kn).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        with model.reading(readout="pushdown"):
            want = model(idx)[0]
        table = model.tables()[0]
        ffn_started = threading.Event()
        inner_fetch = table.fetch

        def fetch_after_ffn(ids, **kw):
            assert ffn_started.wait(timeout=10), "the FFN did not run while the fetch was in flight"
            ffn_started.clear()
            return inner_fetch(ids, **kw)
        table.fetch = fetch_after_ffn
        hooks = [b.ffn.register_forward_pre_hook(lambda m, a: ffn_started.set())
                 for b in model.layers if b.knowledge is not None]
        try:
            got = model(idx)[0]
        finally:
            for hk in hooks:
                hk.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reading_options_nest_and_record_each_call(build):
    """model.reading(k, readout, record): the options hold inside the block (an inner block
    keeps what it leaves unset), the trace has one entry per call, and nothing is left set."""
    model = build("tiny-knowledge").eval()
    (layer,) = model.cfg.knowledge.layers
    idx = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        with model.reading(k=2, record=True) as outer:
            model(idx)
            with model.reading(readout="fetch", record=True) as inner:
                model(idx[:, :3])
            model(idx[:, :4])
        assert [c[layer].ids.shape for c in outer.calls] == [(2, 5, 2, 2), (2, 4, 2, 2)]
        assert [c[layer].ids.shape for c in inner.calls] == [(2, 3, 2, 2)]   # k=2 from the outer block
        torch.testing.assert_close(inner.last()[layer].weights.sum(-1), torch.ones(2, 3, 2))
        with model.reading(k=4, record=True) as trace:                       # the trained k
            want = model(idx)[0]
        assert trace.take()[layer].ids.shape[-1] == 4 and trace.calls == []
        torch.testing.assert_close(model(idx)[0], want)                       # nothing left set
    with pytest.raises(ValueError, match="k=65"):
        with model.reading(k=65):
            pass
    with pytest.raises(ValueError, match="readout mode"):
        with model.reading(readout="nearby"):
            pass
