"""Flat-key top-k: exact chunked search against brute force, faiss against exact."""
import ast
import pathlib

import pytest
import torch

from store_service.config import TableConfig
from store_service.flat_index import FaissFlatIndex, exact_topk, faiss_topk
from store_service.shard import Shard


def _brute(q, keys, k, bias=None, ablated=None):
    s = q @ keys.T
    if bias is not None:
        s = s + bias
    if ablated is not None:
        s = s.masked_fill(ablated, float("-inf"))
    return s.topk(k, dim=1)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_exact_matches_brute_force(chunk_rows):
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(5, 16, generator=g), torch.randn(300, 16, generator=g)
    bias = torch.randn(300, generator=g) * 0.1
    ablated = torch.rand(300, generator=g) < 0.2
    s, i = exact_topk(q, keys, 10, bias, ablated, chunk_rows=chunk_rows)
    bs, bi = _brute(q, keys, 10, bias, ablated)
    assert torch.equal(i, bi)
    torch.testing.assert_close(s, bs)
    assert not bool(ablated[i].any())


def test_exact_pads_when_fewer_rows_selectable():
    keys = torch.randn(6, 4)
    ablated = torch.tensor([True, False, True, False, True, True])
    s, i = exact_topk(torch.randn(3, 4), keys, 5, ablated=ablated, chunk_rows=4)
    assert i.shape == (3, 5)
    assert set(i[:, :2].flatten().tolist()) <= {1, 3}
    assert bool((i[:, 2:] == -1).all()) and bool(torch.isneginf(s[:, 2:]).all())


def test_faiss_flat_ip_agrees_with_exact():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(8, 32, generator=g), torch.randn(2000, 32, generator=g)
    bias = torch.randn(2000, generator=g) * 0.05
    ablated = torch.rand(2000, generator=g) < 0.1
    es, ei = exact_topk(q, keys, 16, bias, ablated)
    fs, fi = faiss_topk(q, keys, 16, bias, ablated)
    assert torch.equal(ei, fi)
    torch.testing.assert_close(fs, es, atol=1e-4, rtol=1e-5)
    # padding path: more k than unablated rows
    idx = FaissFlatIndex()
    s, i = idx.search(q[:2], keys[:4], 6, ablated=torch.tensor([False, True, False, False]))
    assert bool((i[:, 3:] == -1).all()) and bool(torch.isneginf(s[:, 3:]).all())


def test_faiss_is_not_imported_at_module_import():
    """faiss is imported lazily, inside the function that needs it."""
    import store_service
    pkg = pathlib.Path(store_service.__file__).parent
    for name in ("flat_index.py", "shard.py", "table.py", "persistence.py", "config.py", "optimizer.py"):
        tree = ast.parse((pkg / name).read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "faiss" for a in node.names), name
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "faiss", name


def test_shard_faiss_path_matches_exact_path():
    pytest.importorskip("faiss")
    base = dict(d_k=8, d_v=4, segments=[("flat", 500)], bias_step=0.0, seed=3)
    exact = Shard(TableConfig(**base))
    fast = Shard(TableConfig(**base, faiss_threshold=100))
    q = torch.randn(6, 8)
    for sh in (exact, fast):
        sh.set_ablated(torch.tensor([1, 2, 3]))
    a, b = exact.search(q, 7, want_keys=True), fast.search(q, 7, want_keys=True)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.keys, b.keys)
    # The faiss index follows edits: newly ablated rows disappear.
    fast.set_ablated(b.ids[:, 0])
    assert not bool(torch.isin(fast.search(q, 7).ids, b.ids[:, 0]).any())
