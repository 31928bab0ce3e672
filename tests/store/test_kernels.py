"""Readout and product-key kernels: Triton (under TRITON_INTERPRET=1, on the CPU)
against the PyTorch reference, and the reference against autograd/gradcheck.

Shapes are kept small: the interpreter runs every program in numpy.
"""
import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # The interpreter would replace the compiled kernels for every test of this session
    # (the CUDA tests too): on a GPU machine run this file on its own, TRITON_INTERPRET=1.
    pytest.skip("Triton interpreter tests: run `TRITON_INTERPRET=1 pytest tests/store/test_kernels.py` alone "
                "on a CUDA machine", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are (re)built below

import store_service.kernels as K  # noqa: E402
from store_service.kernels import dispatch  # noqa: E402
from store_service.kernels import reference as R  # noqa: E402

triton = pytest.importorskip("triton")

for _m in ("store_service.kernels.triton_readout_sort", "store_service.kernels.triton_readout_chunked",
           "store_service.kernels.triton_readout", "store_service.kernels.triton_pk_search"):  # dependencies first
    if _m in sys.modules:  # imported before the interpreter was switched on: rebuild under it
        importlib.reload(sys.modules[_m])
from store_service.kernels import triton_pk_search as TP  # noqa: E402
from store_service.kernels import triton_readout as TR  # noqa: E402
from store_service.kernels import triton_readout_chunked as TC  # noqa: E402


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(T, k, d, N, dtype, seed, pad_frac=0.15, repeats=True):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(N, d, generator=g).to(dtype)
    ids = torch.randint(0, N, (T, k), generator=g)
    ids[torch.rand(T, k, generator=g) < pad_frac] = -1
    if repeats and T > 2:
        ids[1] = ids[2]                      # the same rows in two tokens
        ids[2, 0] = ids[2, -1]               # the same row twice in one token
    if T > 3:
        ids[3] = -1                          # an all-padding token
    s = torch.randn(T, k, generator=g) * 2
    go = torch.randn(T, d, generator=g)
    return V, ids, s, go


# (T, k, d_v, N): odd sizes, k = 1, few rows (many repeats), d_v not a power of two
SHAPES = [(7, 5, 33, 20), (16, 1, 64, 8), (5, 16, 16, 40), (13, 3, 24, 5)]
# both backward pipelines (these small shapes would all pick chunked by the auto rule)
PIPELINES = ["first", "chunked"]


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_readout_triton_matches_reference(shape, dtype, pipeline):
    T, k, d, N = shape
    # a fixed seed per case (hash() of a str changes from one interpreter to the next)
    V, ids, s, go = _inputs(T, k, d, N, dtype, seed=10 * SHAPES.index(shape) + (dtype == torch.bfloat16))
    Vd = V.double()
    out = TR.softmax_readout_triton(V, ids, s)
    assert out.dtype == torch.float32 and out.shape == (T, d)
    assert _rel(out, R.softmax_readout_reference(Vd, ids, s.double())) < 1e-5
    if T > 3:
        assert torch.all(out[3] == 0)
    gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s, go, pipeline=pipeline)
    rgs, ru, rrg = R.softmax_readout_backward_reference(Vd, ids, s.double(), go.double())
    assert u.dtype == torch.int64 and torch.equal(u, ru)
    assert rg.dtype == torch.float32 and rg.shape == (u.numel(), d)
    assert _rel(rg, rrg) < 1e-5
    assert _rel(gs, rgs) < 1e-5
    assert torch.all(gs[ids < 0] == 0)


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_readout_triton_matches_reference(dtype, pipeline):
    T, k, d, N = 9, 6, 40, 12
    V, ids, s, go = _inputs(T, k, d, N, dtype, seed=7)
    w = torch.rand(T, k)  # any weights, not only softmax ones
    Vd = V.double()
    out = TR.readout_weighted_triton(V, ids, w)
    assert _rel(out, R.readout_weighted_reference(Vd, ids, w.double())) < 1e-5
    gw, u, rg = TR.readout_weighted_backward_triton(V, ids, w, go, pipeline=pipeline)
    rgw, ru, rrg = R.readout_weighted_backward_reference(Vd, ids, w.double(), go.double())
    assert torch.equal(u, ru)
    assert _rel(gw, rgw) < 1e-5 and _rel(rg, rrg) < 1e-5
    assert torch.all(gw[ids < 0] == 0)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_backward_compact_layout_and_edge_cases(pipeline):
    # all padding: no rows, zero score grads
    V = torch.randn(10, 8)
    ids = torch.full((3, 4), -1)
    s, go = torch.randn(3, 4), torch.randn(3, 8)
    out = TR.softmax_readout_triton(V, ids, s)
    assert torch.all(out == 0)
    gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s, go, pipeline=pipeline)
    assert u.numel() == 0 and rg.shape == (0, 8) and torch.all(gs == 0)
    # one row used in every slot of every token: one segment summing all occurrences
    ids = torch.zeros((4, 3), dtype=torch.int64)
    s4, go4 = torch.randn(4, 3), torch.randn(4, 8)
    gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s4, go4, pipeline=pipeline)
    assert u.tolist() == [0]
    torch.testing.assert_close(rg[0], go4.sum(0), rtol=1e-5, atol=1e-5)  # softmax weights sum to 1
    torch.testing.assert_close(gs, torch.zeros(4, 3), rtol=0, atol=1e-6)  # equal rows: flat scores


def test_row_grad_config_variants_agree():
    V, ids, s, go = _inputs(6, 4, 20, 9, torch.float32, seed=3)
    ref = R.softmax_readout_backward_reference(V.double(), ids, s.double(), go.double())
    # the shipped pipeline, whole rows and d split over programs
    for cfg in [(32, 1), (8, 2), (32, 2, False, False), (8, 1, True, False)]:
        gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s, go, config=cfg)
        assert torch.equal(u, ref[1]) and _rel(rg, ref[2]) < 1e-5 and _rel(gs, ref[0]) < 1e-5
    # the previous pipeline (kept as the benchmark's comparison): (un)ordered programs, rows per program
    w = R.masked_softmax(s, ids)
    ref_w = R.readout_weighted_backward_reference(V.double(), ids, w.double(), go.double())
    for cfg in [(32, 1, False, False), (8, 1, True, True), (32, 2, True, True, 2), (8, 4, True, True, 4)]:
        gw, u, rg = TR._readout_backward_sorted(V, ids, w, go, config=cfg)
        assert torch.equal(u, ref_w[1]) and _rel(rg, ref_w[2]) < 1e-5 and _rel(gw, ref_w[0]) < 1e-5
    out = TR.softmax_readout_triton(V, ids, s, config=(4, 8, 16, 1))  # k tiles, d split over programs
    assert _rel(out, R.softmax_readout_reference(V.double(), ids, s.double())) < 1e-5


# ---------------------------------------------------------------------------- chunked backward


def _shuffled(rows_and_counts, k, seed):
    """ids [T, k] holding each row the given number of times, in a random order
    (padding fills the last token)."""
    flat = torch.cat([torch.full((n,), r) for r, n in rows_and_counts])
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))]
    pad = -flat.numel() % k
    return torch.cat([flat, torch.full((pad,), -1)]).reshape(-1, k)


def _chunked_case(case):
    """(ids, N, d, ChunkedConfig) of one layout of the sorted pairs against the chunks."""
    g = torch.Generator().manual_seed(len(case))
    cfg = TC.ChunkedConfig(chunk=8, block_d=16, d_step=8, carry_span=2)
    if case == "padding":            # repeats, padding, an all-padding token; 3 d-blocks of 2 steps
        ids = _inputs(9, 6, 40, 12, torch.float32, seed=7)[1]
        return ids, 12, 40, cfg
    if case == "hot_row":            # one row in almost every pair: a segment over ~14 chunks
        ids = torch.full((20, 6), 3)
        ids[torch.rand(20, 6, generator=g) < 0.1] = 7
        ids[0, 0], ids[5, 2], ids[19, 5] = -1, 0, 9
        return ids, 10, 24, cfg
    if case == "chunk_edges":        # segments of exactly 1 and 2 chunks, and two inside one chunk
        return _shuffled([(0, 8), (1, 16), (2, 4), (5, 4)], 4, seed=1), 6, 16, cfg
    if case == "ragged_tail":        # T*k = 35, not a multiple of the chunk
        return torch.randint(0, 4, (7, 5), generator=g), 4, 20, cfg
    if case == "fewer_pairs_than_chunk":  # the default config: one partial chunk
        return torch.tensor([[2, 2, -1], [0, 2, 5]]), 8, 33, TC.ChunkedConfig()
    if case == "all_padding":
        return torch.full((3, 4), -1), 10, 8, cfg
    if case == "no_tokens":
        return torch.zeros((0, 4), dtype=torch.int64), 10, 8, cfg
    raise KeyError(case)


CHUNKED_CASES = ["padding", "hot_row", "chunk_edges", "ragged_tail", "fewer_pairs_than_chunk", "all_padding",
                 "no_tokens"]


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_chunked_backward_matches_reference(case, dtype, softmax):
    ids, N, d, cfg = _chunked_case(case)
    T, k = ids.shape
    g = torch.Generator().manual_seed(CHUNKED_CASES.index(case))
    V = torch.randn(N, d, generator=g).to(dtype)
    s, go = torch.randn(T, k, generator=g), torch.randn(T, d, generator=g)
    w = torch.rand(T, k, generator=g)
    if softmax:
        grad, u, rg = TR.softmax_readout_backward_triton(V, ids, s, go, config=cfg)
    else:
        grad, u, rg = TR.readout_weighted_backward_triton(V, ids, w, go, config=cfg)
    if T == 0:  # (the reference does not take T = 0)
        ref = (torch.zeros(0, k), torch.zeros(0, dtype=torch.int64), torch.zeros(0, d))
    elif softmax:
        ref = R.softmax_readout_backward_reference(V.double(), ids, s.double(), go.double())
    else:
        ref = R.readout_weighted_backward_reference(V.double(), ids, w.double(), go.double())
    assert u.dtype == torch.int64 and torch.equal(u, ref[1])
    assert grad.dtype == rg.dtype == torch.float32 and grad.shape == (T, k) and rg.shape == (u.numel(), d)
    assert torch.all(grad[ids < 0] == 0)
    if u.numel():
        assert _rel(rg, ref[2]) < 1e-5 and _rel(grad, ref[0]) < 1e-5


def test_chunked_backward_is_deterministic_and_agrees_with_first():
    ids, N, d, cfg = _chunked_case("hot_row")
    V, _, s, go = _inputs(*ids.shape, d, N, torch.float32, seed=4, repeats=False)
    runs = [TR.softmax_readout_backward_triton(V, ids, s, go, config=cfg) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the same bits
    first = TR.softmax_readout_backward_triton(V, ids, s, go, pipeline="first")
    assert torch.equal(first[1], runs[0][1])
    torch.testing.assert_close(runs[0][2], first[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][0], first[0], rtol=1e-5, atol=1e-6)


def test_chunked_backward_int64_keys():
    # a table of >= 2^31 - 1 rows sorts int64 keys: one stored row, broadcast (stride 0)
    N, d = 2 ** 31 + 5, 8
    g = torch.Generator().manual_seed(8)
    row = torch.randn(1, d, generator=g)
    V = row.expand(N, d)
    ids = torch.tensor([[N - 1, 0, -1], [2 ** 31, N - 1, N - 1]])
    s, go = torch.randn(2, 3, generator=g), torch.randn(2, d, generator=g)
    gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s, go, pipeline="chunked",
                                                    config=TC.ChunkedConfig(chunk=4, block_d=8))
    ref = R.softmax_readout_backward_reference(row.double().expand(N, d), ids, s.double(), go.double())
    assert torch.equal(u, ref[1]) and _rel(rg, ref[2]) < 1e-5
    # every row is the same, so the score grads are ~0: compare them absolutely
    torch.testing.assert_close(gs.double(), ref[0], rtol=0, atol=1e-6)


def test_backward_pipeline_rule(monkeypatch):
    monkeypatch.delenv(TC.PIPELINE_ENV, raising=False)
    assert TC.backward_pipeline(8, 16, 128) == "chunked"        # T*k == N: chunked
    assert TC.backward_pipeline(8, 16, 129) == "first"
    assert TC.backward_pipeline(131072, 16, 123904) == "chunked"  # the capacity model's step
    assert TC.backward_pipeline(16384, 32, 2 ** 20) == "first"    # benchmarks/kernels.py's shape
    monkeypatch.setenv(TC.PIPELINE_ENV, "first")
    assert TC.backward_pipeline(8, 16, 1) == "first"
    assert TC.backward_pipeline(8, 16, 1, "auto") == "chunked"   # the argument beats the env var
    monkeypatch.setenv(TC.PIPELINE_ENV, "chunked")
    assert TC.backward_pipeline(1, 1, 100) == "chunked"
    with pytest.raises(ValueError):
        TC.backward_pipeline(1, 1, 1, "fast")
    # the entry points run what the rule picks (a tuple config is the first pipeline's)
    monkeypatch.delenv(TC.PIPELINE_ENV)
    calls = []
    real = TR.readout_backward_chunked
    monkeypatch.setattr(TR, "readout_backward_chunked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    V, ids, s, go = _inputs(4, 3, 8, 12, torch.float32, seed=2)
    TR.softmax_readout_backward_triton(V, ids, s, go)                 # 12 pairs, 12 rows
    TR.readout_weighted_backward_triton(V, ids, s.abs(), go)
    TR.softmax_readout_backward_triton(V, ids, s, go, config=(8, 1))
    TR.softmax_readout_backward_triton(torch.randn(13, 8), ids, s, go)  # 12 pairs, 13 rows
    assert len(calls) == 2
    with pytest.raises(ValueError):
        TR.softmax_readout_backward_triton(V, ids, s, go, config=(8, 1), pipeline="chunked")


# ---------------------------------------------------------------------------- reference


def test_reference_gradcheck():
    torch.manual_seed(0)
    V = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 2], [5, -1, 0], [-1, -1, -1], [1, 3, 4]])
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, sc: R.softmax_readout_reference(v, ids, sc), (V, s))
    w = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, ww: R.readout_weighted_reference(v, ids, ww), (V, w))


def test_reference_backward_matches_autograd():
    torch.manual_seed(1)
    V = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 2, -1], [6, 0, 1, 1], [-1, -1, -1, -1]])
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 4, dtype=torch.float64)
    R.softmax_readout_reference(V, ids, s).backward(go)
    gs, u, rg = R.softmax_readout_backward_reference(V.detach(), ids, s.detach(), go)
    dense = torch.zeros_like(V).index_add_(0, u, rg.double())
    torch.testing.assert_close(dense, V.grad)
    torch.testing.assert_close(gs.double(), s.grad)
    assert u.tolist() == [0, 1, 2, 6]


# ---------------------------------------------------------------------------- autograd wrapper


@pytest.mark.parametrize("use_triton", [False, True])
def test_softmax_readout_autograd(monkeypatch, use_triton):
    if use_triton:  # route the dispatcher to the Triton kernels (interpreted) on CPU tensors
        monkeypatch.setattr(dispatch, "_use_triton", lambda t: True)
    torch.manual_seed(2)
    ids = torch.tensor([[0, 3, 3], [2, -1, 0], [4, 1, 0]])
    V = torch.randn(5, 6, requires_grad=True)
    s = torch.randn(3, 3, requires_grad=True)
    go = torch.randn(3, 6)
    K.softmax_readout(V, ids, s).backward(go)
    V2, s2 = V.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    R.softmax_readout_reference(V2, ids, s2).backward(go)
    torch.testing.assert_close(V.grad, V2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-6)
    # sparse gradient for values
    V3 = V.detach().clone().requires_grad_(True)
    K.SoftmaxReadout.apply(V3, ids, s.detach(), True).backward(go)
    assert V3.grad.is_sparse
    torch.testing.assert_close(V3.grad.to_dense(), V2.grad, rtol=1e-5, atol=1e-6)


def _loop_readout(V, ids, s):
    """An independent reference, one token and one slot at a time: the softmax over a
    token's non-padding slots, the weighted sum of their rows (an all-padding token: 0)."""
    T, k = ids.shape
    rows = []
    for t in range(T):
        valid = [j for j in range(k) if int(ids[t, j]) >= 0]
        out = V.new_zeros(V.shape[1])
        if valid:
            w = torch.softmax(s[t, valid], 0)
            for wj, j in zip(w, valid):
                out = out + wj * V[int(ids[t, j])]
        rows.append(out)
    return torch.stack(rows)


def test_dispatch_cpu_matches_an_independent_loop():
    V, ids, s, go = _inputs(5, 3, 8, 6, torch.float32, seed=5)
    Vd, sd = V.double().requires_grad_(True), s.double().requires_grad_(True)
    ref = _loop_readout(Vd, ids, sd)
    ref.backward(go.double())
    torch.testing.assert_close(K.softmax_readout_forward(V, ids, s).double(), ref.detach(), rtol=1e-5, atol=1e-6)
    grad_s, uniq, row_grads = K.softmax_readout_backward(V, ids, s, go)
    torch.testing.assert_close(grad_s.double(), sd.grad, rtol=1e-5, atol=1e-6)        # 0 at padding slots
    dense = torch.zeros_like(Vd).index_add_(0, uniq, row_grads.double())
    torch.testing.assert_close(dense, Vd.grad, rtol=1e-5, atol=1e-6)                  # rows never read: 0
    assert set(uniq.tolist()) == {int(i) for i in ids.flatten() if int(i) >= 0}


# ---------------------------------------------------------------------------- product keys


@pytest.mark.parametrize("B,n,d,k,bias", [(16, 32, 16, 8, False), (5, 10, 8, 5, True),
                                          (17, 16, 24, 1, True), (3, 3, 8, 8, False),
                                          (4, 1024, 16, 32, False), (3, (5, 40), 8, 16, True),
                                          (3, (40, 3), 8, 64, False)])
def test_pk_search_triton_matches_reference(B, n, d, k, bias):
    na, nb = n if isinstance(n, tuple) else (n, n)  # rectangular: a shard's slice of codebook A
    g = torch.Generator().manual_seed(B * na + nb + k)
    qa, qb = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    ca, cb = torch.randn(na, d, generator=g), torch.randn(nb, d, generator=g)
    ba = torch.randn(na, generator=g) if bias else None
    bb = torch.randn(nb, generator=g) if bias else None
    s, i = TP.product_key_search_triton(qa, qb, ca, cb, k, ba, bb)
    rs, ri = R.product_key_search_reference(qa, qb, ca, cb, k, ba, bb)
    assert s.shape == (B, k) and i.dtype == torch.int64
    torch.testing.assert_close(s, rs, rtol=0, atol=1e-5)
    assert torch.equal(i, ri)  # continuous random scores: no ties


def test_pk_search_ties_and_bf16():
    # integer-valued scores tie a lot: same scores as the reference, ids consistent with them
    g = torch.Generator().manual_seed(11)
    B, n, d, k = 16, 16, 16, 8
    qa = torch.randint(-2, 3, (B, d), generator=g).float()
    qb = torch.randint(-2, 3, (B, d), generator=g).float()
    ca = torch.randint(-1, 2, (n, d), generator=g).to(torch.bfloat16)
    cb = torch.randint(-1, 2, (n, d), generator=g).to(torch.bfloat16)
    s, i = TP.product_key_search_triton(qa, qb, ca, cb, k)
    rs, _ = R.product_key_search_reference(qa, qb, ca, cb, k)
    torch.testing.assert_close(s, rs)
    full = (qa @ ca.float().T)[:, :, None] + (qb @ cb.float().T)[:, None, :]
    torch.testing.assert_close(full.reshape(B, -1).gather(1, i), s)
    assert all(len(set(r)) == k for r in i.tolist())  # distinct ids per query


def test_pk_search_ties_go_to_the_smaller_id():
    # all sub-key scores equal: every row ties, so the k smallest ids win, in id order
    B, n, d, k = 2, 8, 4, 5
    ca = cb = torch.ones(n, d)
    q = torch.ones(B, d)
    s, i = TP.product_key_search_triton(q, q, ca, cb, k)
    assert i.tolist() == [list(range(k))] * B
    torch.testing.assert_close(s, torch.full((B, k), 2.0 * d))


def test_pk_search_minus_inf_bias_pads():
    # a -inf bias removes sub-keys: fewer than k selectable rows -> PAD_ID / -inf, as the reference
    g = torch.Generator().manual_seed(3)
    B, n, d, k = 4, 4, 8, 8
    qa, qb = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    ca, cb = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ba = torch.tensor([0.0, float("-inf"), float("-inf"), 0.0])
    bb = torch.tensor([0.0, 0.0, float("-inf"), float("-inf")])
    s, i = TP.product_key_search_triton(qa, qb, ca, cb, k, ba, bb)
    rs, ri = R.product_key_search_reference(qa, qb, ca, cb, k, ba, bb)
    torch.testing.assert_close(s, rs, rtol=0, atol=1e-5)
    assert torch.equal(i[:, :4].sort(-1).values, ri[:, :4].sort(-1).values)
    assert (i[:, 4:] == R.PAD_ID).all() and torch.isneginf(s[:, 4:]).all()


@pytest.mark.parametrize("na,nb,k", [(3, 16, 8), (16, 5, 4), (7, 7, 49), (2, 3, 10)])
def test_pk_reference_rectangular_slice_is_exact(na, nb, k):
    """A shard searches its slice of the first codebook against the whole second
    one: exact top-k over na x nb, ids i*nb + j, ablated rows never chosen,
    padding when fewer than k rows are selectable."""
    from store_service.kernels.reference import product_key_search_reference
    g = torch.Generator().manual_seed(na * 100 + nb)
    qa, qb = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    ca, cb = torch.randn(na, 6, generator=g), torch.randn(nb, 6, generator=g)
    ablated = torch.rand(na * nb, generator=g) < 0.3
    full = ((qa @ ca.T).unsqueeze(-1) + (qb @ cb.T).unsqueeze(-2)).reshape(5, -1)
    for mask in (None, ablated):
        s, ids = product_key_search_reference(qa, qb, ca, cb, k, ablated=mask)
        ref = full if mask is None else full.masked_fill(mask, float("-inf"))
        kk = min(k, int((~torch.isinf(ref[0])).sum()))
        top, pos = ref.topk(kk, dim=-1)
        torch.testing.assert_close(s[:, :kk], top)
        assert torch.equal(ids[:, :kk], pos)
        assert bool((ids[:, kk:] == -1).all()) and bool(torch.isneginf(s[:, kk:]).all())
