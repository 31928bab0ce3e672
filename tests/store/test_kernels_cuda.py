"""The readout backward's compiled Triton pipelines on a GPU against the PyTorch reference
(test_kernels.py checks them under the interpreter on the CPU; compiled kernels can differ).

Both pipelines at a shape with hot rows (many pairs a row, segments across chunks) and at
one with little reuse, for the weighted and the softmax readout, and the chunked one for
determinism. Skipped without CUDA.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ids(T, K, N, hot: bool, gen):
    if hot:     # P(row) ~ 1/sqrt(rank): the hottest rows take thousands of pairs
        u = torch.rand(T, K, generator=gen, device="cuda")
        ids = torch.randperm(N, generator=gen, device="cuda")[(N * u ** 2).long().clamp_max(N - 1)]
    else:
        ids = torch.randint(0, N, (T, K), generator=gen, device="cuda")
    ids[::7, -1] = -1       # some padding
    return ids


@pytest.mark.parametrize("pipeline", ["first", "chunked"])
@pytest.mark.parametrize("hot", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_pipelines_match_the_reference_on_the_gpu(pipeline, hot, dtype):
    from store_service.kernels import reference as R
    from store_service.kernels import triton_readout as TR
    gen = torch.Generator(device="cuda").manual_seed(3)
    T, K, D = 8192, 16, 128
    N = 4096 if hot else 1 << 20
    V = torch.randn(N, D, device="cuda", generator=gen).to(dtype)
    ids = _ids(T, K, N, hot, gen)
    s = torch.randn(T, K, device="cuda", generator=gen)
    g = torch.randn(T, D, device="cuda", generator=gen)
    gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s, g, pipeline=pipeline)
    rgs, ru, rrg = R.softmax_readout_backward_reference(V.double(), ids, s.double(), g.double())
    assert torch.equal(u, ru)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rg.double(), rrg, rtol=1e-4, atol=1e-3)
    w = torch.softmax(s, -1)
    gw, u2, rg2 = TR.readout_weighted_backward_triton(V, ids, w, g, pipeline=pipeline)
    rgw, ru2, rrg2 = R.readout_weighted_backward_reference(V.double(), ids, w.double(), g.double())
    assert torch.equal(u2, ru2)
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(rg2.double(), rrg2, rtol=1e-4, atol=1e-3)


def test_the_chunked_backward_gives_the_same_bits_twice_on_the_gpu():
    from store_service.kernels import triton_readout as TR
    gen = torch.Generator(device="cuda").manual_seed(4)
    V = torch.randn(2048, 64, device="cuda", generator=gen)
    ids = _ids(4096, 16, 2048, True, gen)
    s = torch.randn(4096, 16, device="cuda", generator=gen)
    g = torch.randn(4096, 64, device="cuda", generator=gen)
    a = TR.softmax_readout_backward_triton(V, ids, s, g, pipeline="chunked")
    b = TR.softmax_readout_backward_triton(V, ids, s, g, pipeline="chunked")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
