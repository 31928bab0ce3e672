"""Deployment knobs: k at inference, reordering (same function, ids remapped), the hot-row cache."""
import torch

from model_worker import knobs as K
from model_worker.data import ByteTokenizer
from model_worker.model import Transformer
from model_worker.train import TrainConfig, create_table, model_config
from store_service.table import Table

TEXTS = ["The capital of Xland is Zorp.", "Zorp is the capital of Xland.", "The currency of Quux is the blip.",
         "Vorn lies on the continent of Mure.", "Q: What is the capital of Vorn? A: Tesk"] * 2


def make(tmp_path, flat_rows=0):
    cfg = TrainConfig(model="tiny-knowledge", model_overrides={"block_size": 128}, out_dir=str(tmp_path),
                      flat_rows=flat_rows)
    mcfg = model_config(cfg, 260)
    table = create_table(mcfg, cfg, str(tmp_path / "store"))
    torch.manual_seed(0)
    return Transformer(mcfg, table).eval(), table


def test_inference_k(tmp_path):
    model, _ = make(tmp_path)
    kl = model.knowledge_layers()[0]
    kl.record = True
    with K.inference_k(model, 2):
        model(torch.randint(0, 256, (1, 8)))
        assert kl.last_ids.shape[-1] == 2
    assert kl.k == 4


def test_reorder_keeps_the_function_and_remaps_ids(tmp_path):
    model, table = make(tmp_path, flat_rows=16)
    tok = ByteTokenizer()
    x = torch.tensor([tok.encode(TEXTS[0], bos=True)])
    kl = model.knowledge_layers()[0]
    kl.record = True
    ref = model(x)[0]
    ids_before = kl.last_ids.clone()
    version = table.snapshot()
    trace = K.usage_trace(model, tok, TEXTS)
    plan = K.cooccurrence_order(trace, table.info().num_rows, kl.n)
    assert sorted(plan.old_of_new.tolist()) == list(range(table.info().num_rows))
    new_version = K.publish_reordered(table.store_root, version, plan)
    old_vals = table.fetch(torch.arange(table.info().num_rows))
    new_table = Table.open(table.store_root, new_version)
    torch.testing.assert_close(new_table.fetch(plan.remap(torch.arange(table.info().num_rows))), old_vals,
                               rtol=0, atol=0)
    K.permute_model(model, plan)
    model.attach_table(new_table)
    kl.record = True
    torch.testing.assert_close(model(x)[0], ref)
    same = torch.sort(plan.remap(ids_before), -1).values == torch.sort(kl.last_ids, -1).values
    assert float(same.float().mean()) > 0.99


def test_locality_counts():
    trace = [torch.tensor([0, 1, 2, 3]), torch.tensor([8, 40])]
    loc = K.locality(trace, page_rows=4, group=1)
    assert loc["pages"] == 1.5 and loc["runs"] == 1.5 and loc["rows"] == 3.0


def test_cached_table(tmp_path):
    _, table = make(tmp_path)
    c = K.CachedTable(table, capacity=4, policy="lru")
    ids = torch.tensor([1, 2, -1, 3])
    torch.testing.assert_close(c.fetch(ids), table.fetch(ids), rtol=0, atol=0)
    assert c.stats()["misses"] == 3 and c.stats()["hits"] == 0
    c.fetch(torch.tensor([1, 2]))
    assert c.stats()["hits"] == 2
    c.fetch(torch.tensor([4, 5]))          # evicts the least recent (3, then 1)
    assert c.cached_ids() == {1, 2, 4, 5}
    c.fetch(torch.tensor([3]))
    assert c.stats()["misses"] == 6
    lfu = K.CachedTable(table, capacity=2, policy="lfu")
    for _ in range(3):
        lfu.fetch(torch.tensor([7]))
    lfu.fetch(torch.tensor([8]))
    lfu.fetch(torch.tensor([9]))           # evicts 8 (1 use), keeps 7 (3 uses)
    assert 7 in lfu.cached_ids() and 8 not in lfu.cached_ids()
    v = table.snapshot()
    lfu.load_version(v)                    # rows may have changed: the cache empties
    assert lfu.cached_ids() == set()


def test_cached_table_warm_from_usage(tmp_path):
    _, table = make(tmp_path)
    n = table.info().num_rows
    read = torch.tensor([[5, 9, 9, 9], [5, 9, 12, -1], [5, 30, 12, 1]])
    table.readout(read, torch.full(read.shape, 0.25))              # the store counts these reads
    hits = table.usage().hits
    hot = torch.topk(hits.double(), 3).indices
    assert set(hot.tolist()) == {5, 9, 12}
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(table, name)

        def fetch(self, ids):
            calls.append(ids)
            return table.fetch(ids)

    c = K.CachedTable(Counting(), capacity=3, policy="lfu")
    assert c.warm() == 3 and c.cached_ids() == set(hot.tolist())
    calls.clear()
    torch.testing.assert_close(c.fetch(hot), table.fetch(hot), rtol=0, atol=0)
    assert calls == [] and c.stats()["call_hit_rate"] == 1.0        # served without touching the store
    assert c.warm(torch.tensor([n - 1])) == 1 and n - 1 in c.cached_ids()
