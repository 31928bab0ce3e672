"""Deployment knobs: k at inference (a per-call option), reordering (same function, ids
remapped: model_worker.reorder), the hot-row cache (store_service.cached_table)."""
import inspect

import pytest
import torch

from model_worker import reorder as R
from model_worker.data import ByteTokenizer
from store_service.cached_table import CachedTable
from store_service.interface import KnowledgeTable
from store_service.table import Table

TEXTS = ["The capital of Xland is Zorp.", "Zorp is the capital of Xland.", "The currency of Quux is the blip.",
         "Vorn lies on the continent of Mure.", "Q: What is the capital of Vorn? A: Tesk"] * 2


@pytest.fixture
def make(tiny_knowledge):
    def build(flat_rows=0):
        model, table = tiny_knowledge(flat_rows=flat_rows)
        return model.eval(), table
    return build


def test_inference_k(make):
    model, _ = make()
    kl = model.knowledge_layers()[0]
    with model.reading(k=2, record=True) as trace:
        model(torch.randint(0, 256, (1, 8)))
    assert trace.last()[1].ids.shape[-1] == 2
    assert kl.k == 4


def test_reorder_keeps_the_function_and_remaps_ids(make):
    model, table = make(flat_rows=16)
    tok = ByteTokenizer()
    x = torch.tensor([tok.encode(TEXTS[0], bos=True)])
    kl = model.knowledge_layers()[0]
    with model.reading(record=True) as before:
        ref = model(x)[0]
    version = table.snapshot()
    trace = R.usage_trace(model, tok, TEXTS)
    plan = R.cooccurrence_order(trace, table.info().num_rows, kl.n)
    assert sorted(plan.old_of_new.tolist()) == list(range(table.info().num_rows))
    new_version = R.publish_reordered(table.store_root, version, plan)
    old_vals = table.fetch(torch.arange(table.info().num_rows))
    new_table = Table.open(table.store_root, new_version)
    torch.testing.assert_close(new_table.fetch(plan.remap(torch.arange(table.info().num_rows))), old_vals,
                               rtol=0, atol=0)
    R.permute_model(model, plan)
    model.attach_table(new_table)
    with model.reading(record=True) as after:
        torch.testing.assert_close(model(x)[0], ref)
    ids_before, ids_after = before.last()[1].ids, after.last()[1].ids
    same = torch.sort(plan.remap(ids_before), -1).values == torch.sort(ids_after, -1).values
    assert float(same.float().mean()) > 0.99


def test_locality_counts():
    trace = [torch.tensor([0, 1, 2, 3]), torch.tensor([8, 40])]
    loc = R.locality(trace, page_rows=4, group=1)
    assert loc["pages"] == 1.5 and loc["runs"] == 1.5 and loc["rows"] == 3.0


def test_cached_table(make):
    _, table = make()
    c = CachedTable(table, capacity=4, policy="lru")
    ids = torch.tensor([1, 2, -1, 3])
    torch.testing.assert_close(c.fetch(ids), table.fetch(ids), rtol=0, atol=0)
    assert c.stats()["misses"] == 3 and c.stats()["hits"] == 0
    c.fetch(torch.tensor([1, 2]))
    assert c.stats()["hits"] == 2
    c.fetch(torch.tensor([4, 5]))          # evicts the least recent (3, then 1)
    assert c.cached_ids() == {1, 2, 4, 5}
    c.fetch(torch.tensor([3]))
    assert c.stats()["misses"] == 6
    lfu = CachedTable(table, capacity=2, policy="lfu")
    for _ in range(3):
        lfu.fetch(torch.tensor([7]))
    lfu.fetch(torch.tensor([8]))
    lfu.fetch(torch.tensor([9]))           # evicts 8 (1 use), keeps 7 (3 uses)
    assert 7 in lfu.cached_ids() and 8 not in lfu.cached_ids()
    v = table.snapshot()
    lfu.load_version(v)                    # rows may have changed: the cache empties
    assert lfu.cached_ids() == set()


def test_cached_table_warm_from_usage(make):
    _, table = make()
    n = table.info().num_rows
    read = torch.tensor([[5, 9, 9, 9], [5, 9, 12, -1], [5, 30, 12, 1]])
    table.readout(read, torch.full(read.shape, 0.25))              # the store counts these reads
    hits = table.usage().hits
    hot = torch.topk(hits.double(), 3).indices
    assert set(hot.tolist()) == {5, 9, 12}
    calls = []

    class Counting(CachedTable):                 # the table itself, its fetches counted
        def __init__(self):
            self.inner = table

        def fetch(self, ids, **kw):
            calls.append(ids)
            return table.fetch(ids, **kw)

    c = CachedTable(Counting(), capacity=3, policy="lfu")
    assert c.warm() == 3 and c.cached_ids() == set(hot.tolist())
    calls.clear()
    torch.testing.assert_close(c.fetch(hot), table.fetch(hot), rtol=0, atol=0)
    assert calls == [] and c.stats()["call_hit_rate"] == 1.0        # served without touching the store
    assert c.warm(torch.tensor([n - 1])) == 1 and n - 1 in c.cached_ids()


def test_cached_table_implements_the_table_interface_itself(make):
    """Every KnowledgeTable call is a method of CachedTable (no attribute forwarding), with
    the protocol's parameters, and a model reads through it as through the table."""
    for name, want in inspect.getmembers(KnowledgeTable, inspect.isfunction):
        if name.startswith("_"):
            continue
        got = getattr(CachedTable, name, None)
        assert inspect.isfunction(got), name
        assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name
    assert not hasattr(CachedTable, "__getattr__")
    model, table = make(flat_rows=8)
    cached = CachedTable(table, capacity=16)
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad(), model.reading(readout="fetch"):
        want = model(x)[0]
        model.attach_table(cached)
        torch.testing.assert_close(model(x)[0], want, rtol=0, atol=0)
    assert cached.stats()["misses"] > 0 and cached.store_root == table.store_root
