"""Interpretability: per-row top contexts, explain, ablation through the admin API."""
import pytest
import torch

from model_worker import interpret as I
from model_worker.data import ByteTokenizer
from model_worker.learn import TextFact

TEXTS = ["The capital of Xland is Zorp.", "Zorp is the capital of Xland.", "The currency of Quux is the blip.",
         "Vorn lies on the continent of Mure.", "Q: What is the capital of Vorn? A: Tesk"]


@pytest.fixture
def make(tiny_knowledge):
    def build(tmp_path):
        model, table = tiny_knowledge()
        return model.eval(), table
    return build


def test_row_contexts_keep_the_heaviest_document_per_row():
    g = torch.Generator().manual_seed(0)
    N, m, P = 20, 3, 500
    rows = torch.randint(0, N, (P,), generator=g)
    w = torch.rand(P, generator=g)
    docs = torch.randint(0, 12, (P,), generator=g)
    pos = torch.randint(0, 50, (P,), generator=g)
    ctx = I.RowContexts.empty(N, m)
    for s in range(0, P, 97):  # in several batches
        ctx.update(rows[s:s + 97], w[s:s + 97], docs[s:s + 97], pos[s:s + 97])
    for r in range(N):
        best: dict[int, float] = {}
        for i in (rows == r).nonzero().squeeze(1).tolist():
            best[int(docs[i])] = max(best.get(int(docs[i]), -1.0), float(w[i]))
        want = sorted(best.items(), key=lambda kv: -kv[1])[:m]
        got = [(int(d), float(x)) for d, x in zip(ctx.doc[r], ctx.weight[r]) if d >= 0]
        assert [d for d, _ in got] == [d for d, _ in want]
        assert all(abs(a - b[1]) < 1e-6 for (_, a), b in zip(got, want))


def test_collect_explain_and_save(tmp_path, make):
    model, table = make(tmp_path)
    tok = ByteTokenizer()
    hits_before = table.usage().hits.clone()
    ctx, usage = I.collect_row_contexts(model, tok, TEXTS, m=4, batch_size=2)
    assert torch.equal(table.usage().hits, hits_before)     # fetch readout: store usage untouched
    assert int(usage.hits.sum()) > 0 and (ctx.doc >= 0).any()
    e = I.explain(model, tok, "The capital of Xland is", contexts=ctx, max_new_tokens=3, top_rows=3)
    layer = next(iter(e["layers"].values()))
    assert len(layer) >= len("The capital of Xland is")
    for t in layer:
        assert 0 < len(t["rows"]) <= 3
        assert sum(r["weight"] for r in t["rows"]) <= 1.0 + 1e-4
    used = [r for t in layer for r in t["rows"] if r.get("contexts")]
    assert used and "[" in used[0]["contexts"][0]["text"]
    assert "knowledge layer" in I.format_explanation(e)
    path = I.row_contexts_path(str(tmp_path / "store"), 1)
    ctx.save(path)
    again = I.RowContexts.load(path)
    assert torch.equal(again.doc, ctx.doc) and again.texts == ctx.texts


def test_ablated_rows_are_never_read_and_restore(tmp_path, make):
    model, table = make(tmp_path)
    tok = ByteTokenizer()
    ex = [TextFact("The capital of Xland is", " Zorp.", "Zorp", "capital_of", "Xland")]
    rows = I.answer_rows(model, tok, ex, per_fact=6)[0]
    assert rows.numel() == 6
    with I.ablated(model, rows) as fresh:
        assert torch.equal(fresh, torch.unique(rows))
        assert bool(table.usage().ablated[rows].all())
        again = I.answer_rows(model, tok, ex, per_fact=6)[0]
        assert not bool(torch.isin(again, rows).any())
    assert not bool(table.usage().ablated.any())
