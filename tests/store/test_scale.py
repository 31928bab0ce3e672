"""The store at scale, on small tables: streamed creation equals the whole-table draw it
replaces; host-memory shards answer as resident ones; flat search over many rows."""
import pytest
import torch

from store_service import init_rows
from store_service.config import TableConfig
from store_service.flat_index import exact_topk, flat_topk
from store_service.host_rows import gather_rows
from store_service.interface import SEGMENT_FLAT
from store_service.state import init_state
from store_service.table import Table


# -- the creation path before streaming, kept as the reference -----------------------------

def _ref_gen(seed, stream, block):
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_003 + block)


def _ref_init_rows(cfg, lo, hi, stream, dim, scale):
    parts = []
    for b in range(lo // 4096, -(-hi // 4096)):
        block = torch.randn(4096, dim, generator=_ref_gen(cfg.seed, stream, b)) * scale
        b0 = b * 4096
        parts.append(block[max(lo, b0) - b0:min(hi, b0 + 4096) - b0])
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def _ref_values_keys(cfg, lo, hi):
    vdtype = torch.bfloat16 if cfg.value_dtype == "bfloat16" else torch.float32
    values = _ref_init_rows(cfg, lo, hi, 0, cfg.d_v, cfg.init_scale).to(vdtype)
    segs = cfg.segment_infos()
    flat_ids = torch.cat([torch.arange(max(lo, s.row_start), max(lo, s.row_start, min(hi, s.row_end)))
                          for s in segs if s.kind == SEGMENT_FLAT] + [torch.zeros(0, dtype=torch.int64)])
    keys = _ref_init_rows(cfg, lo, hi, 1, cfg.d_k, cfg.key_init_scale)[flat_ids - lo]
    return values, keys, flat_ids


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_streamed_creation_is_bitwise_the_whole_table_draw(value_dtype, num_shards):
    # flat rows on both sides of a product segment, blocks shared by segments and by shards
    cfg = TableConfig(d_k=8, d_v=12, segments=[("flat", 5000), ("product", 80), ("flat", 3000)],
                      value_dtype=value_dtype, num_shards=num_shards, seed=3, init_scale=0.05)
    for sid, (lo, hi) in enumerate(cfg.shard_ranges()):
        st = init_state(cfg, sid, lo, hi)
        values, keys, flat_ids = _ref_values_keys(cfg, lo, hi)
        assert st.values.dtype == values.dtype and torch.equal(st.values, values)
        assert torch.equal(st.keys, keys) and torch.equal(st.flat_ids, flat_ids)


@pytest.mark.parametrize("workers", [1, 3])
def test_draw_rows_any_ranges_and_workers(workers):
    ranges = [(10, 4100), (4100, 4200), (9000, 13000)]
    got = init_rows.draw_rows(7, 1, 5, 0.3, ranges, dtype=torch.bfloat16, workers=workers)
    cfg = TableConfig(d_k=4, d_v=5, segments=[("flat", 13000)], seed=7)
    want = torch.cat([_ref_init_rows(cfg, lo, hi, 1, 5, 0.3) for lo, hi in ranges]).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert init_rows.draw_rows(7, 1, 5, 0.3, []).shape == (0, 5)


def test_creation_never_draws_keys_for_product_rows(monkeypatch):
    """Product rows have no keys: their blocks are never drawn for stream 1."""
    drawn = []
    real = init_rows.block_gen
    monkeypatch.setattr(init_rows, "block_gen", lambda seed, stream, b: drawn.append((stream, b)) or real(seed, stream, b))
    cfg = TableConfig(d_k=8, d_v=4, segments=[("product", 128), ("flat", 10)])   # 16384 product rows
    init_state(cfg, 0, 0, cfg.num_rows)
    assert sorted(b for s, b in drawn if s == 1) == [4]        # the flat rows' one block
    assert sorted(b for s, b in drawn if s == 0) == [0, 1, 2, 3, 4]


# -- host-memory shards ------------------------------------------------------------------------

def _cfg(**kw):
    return TableConfig(d_k=8, d_v=16, segments=[("product", 16), ("flat", 200)], num_shards=2,
                       value_dtype="bfloat16", bias_step=0.0, seed=1, **kw)


def test_host_memory_table_answers_as_the_resident_one(tmp_path):
    resident = Table.create(_cfg())
    host = Table.create(_cfg(device="cpu", pin_memory=True))
    ids = torch.tensor([0, 5, -1, 255, 300, 455, -1, 17])
    assert torch.equal(host.fetch(ids), resident.fetch(ids))
    q = torch.randn(3, 8)
    assert torch.equal(host.search(q, 5).ids, resident.search(q, 5).ids)
    # the same after a published round trip, opened as host rows
    v = Table.create(_cfg(), str(tmp_path)).snapshot()
    reopened = Table.open(str(tmp_path), v, device="cpu", pin_memory=True)
    assert torch.equal(reopened.fetch(ids), resident.fetch(ids))
    mem = reopened.shards[0].memory()
    assert mem["device"] == "cpu" and mem["pinned"] == torch.cuda.is_available()
    assert mem["value_bytes"] == mem["rows"] * 16 * 2


def test_gather_rows_pads_and_matches_indexing():
    values = torch.randn(50, 6).to(torch.bfloat16)
    rows = torch.tensor([3, 0, 49, 7, 7])
    pad = torch.tensor([False, True, False, False, True])
    out = gather_rows(values, rows, "cpu", pad=pad)
    want = values[rows].clone()
    want[pad] = 0
    assert torch.equal(out, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gather_rows_host_to_gpu_equals_resident():
    values = torch.randn(1000, 64).to(torch.bfloat16).pin_memory()
    rows = torch.randint(0, 1000, (300,), device="cuda")
    out = gather_rows(values, rows, "cuda")
    assert out.is_cuda and torch.equal(out.cpu(), values[rows.cpu()])


# -- flat search over many rows -----------------------------------------------------------------

def test_flat_topk_torch_chunked_equals_one_block():
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(20_000, 16, generator=g), torch.randn(6, 16, generator=g)
    bias = torch.randn(20_000, generator=g) * 0.1
    s, i = flat_topk(q, keys, 9, bias, backend="torch", chunk_rows=1500)
    s1, i1 = exact_topk(q, keys, 9, bias, chunk_rows=20_000)
    assert torch.equal(i, i1)
    torch.testing.assert_close(s, s1)
    fs, fi = flat_topk(q, keys, 9, bias, backend="faiss")
    assert torch.equal(fi, i1)
    with pytest.raises(ValueError):
        flat_topk(q, keys, 9, backend="nope")


def test_exact_topk_score_block_is_bounded(monkeypatch):
    """The chunk is sized so one score block holds at most _SCORE_ELEMS floats (or 4096 rows)."""
    from store_service import flat_index
    seen = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(flat_index, "_SCORE_ELEMS", 4096 * 8)
    keys, q = torch.randn(100_000, 4), torch.randn(16, 4)

    def spy(t, *a, **kw):
        seen.append(t.numel())
        return real_topk(t, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "topk", spy)
    exact_topk(q, keys, 3)
    assert max(seen) <= 16 * 4096 and len(seen) > 20


def test_search_over_a_million_flat_rows_on_one_shard():
    """A shard of 2^20 flat rows: created streamed, searched exactly (chunked), as brute force."""
    n = 1 << 20
    t = Table.create(TableConfig(d_k=8, d_v=2, segments=[("flat", n)], value_dtype="bfloat16", bias_step=0.0))
    st = t.shards[0]._serving
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    res = t.search(q, 5)
    want = (q @ st.keys.T).topk(5, dim=1)
    assert torch.equal(res.ids, want.indices)
    s, i = flat_topk(q, st.keys, 5, backend="torch", chunk_rows=1 << 16)
    assert torch.equal(i, want.indices)
