"""The knowledge layer against a dense reference that holds the whole table in
tensors: same selection, same output, same gradients to q (W_q), the codebooks,
the values and the flat keys; pushdown == fetch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_worker.config import KnowledgeConfig
from model_worker.knowledge_layer import KnowledgeLayer
from model_worker.reading import ReadOptions


def dense_reference(layer: KnowledgeLayer, table, x: torch.Tensor, k: int | None = None):
    """The layer's math with every key and value a leaf tensor -> (y, ids, V, Kf); k rows
    per head (default: the layer's)."""
    B, S, D = x.shape
    h, k, n, P = layer.n_heads, k or layer.k, layer.n, table.P
    q = layer.q_norm(layer.wq(x).view(-1, layer.d_k))
    ca, cb = layer.codebooks()
    keys_prod = torch.cat([ca.repeat_interleave(n, 0), cb.repeat(n, 1)], dim=-1)    # [n^2, d_k], row i*n+j
    Kf = table.flat_keys.clone().requires_grad_()
    V = table.values.clone().requires_grad_()
    K = torch.cat([keys_prod, Kf])
    bias = torch.cat([(layer.bias_a[:, None] + layer.bias_b[None, :]).reshape(-1), table.flat_bias])
    with torch.no_grad():
        sel = (q @ K.T + bias).masked_fill(table.ablated, float("-inf"))
        ids = sel.topk(k, dim=-1).indices
    w = torch.softmax((q.unsqueeze(1) * K[ids]).sum(-1) / layer.cfg.tau, dim=-1)
    r = (w.unsqueeze(-1) * V[ids]).sum(1)
    y = layer.wo(r.view(B, S, h * layer.d_v))
    if layer.wg is not None:
        y = y * F.silu(layer.wg(x))
    return y, ids, V, Kf


def _layer(table, readout="pushdown", **kw):
    cfg = KnowledgeConfig(**{**dict(n_heads=2, d_k=8, d_v=6, k=5, n_sub=6, tau=0.7, readout=readout), **kw})
    torch.manual_seed(0)
    layer = KnowledgeLayer(12, cfg, table)
    with torch.no_grad():
        layer.bias_a.normal_(0, 0.1)
        layer.bias_b.normal_(0, 0.1)
        layer.wo.weight.normal_(0, 0.3)
        layer.wg.weight.normal_(0, 0.3) if layer.wg is not None else None
    return layer


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_flat", [0, 20])
@pytest.mark.parametrize("readout", ["pushdown", "fetch"])
@pytest.mark.parametrize("output_gate,qk_norm", [(True, True), (False, False)])
def test_forward_backward_matches_dense_reference(n_flat, readout, output_gate, qk_norm, tensor_table):
    table = tensor_table(8, 6, 6, n_flat)
    table.ablated[[3, 7, 30]] = True
    if n_flat:
        table.ablated[table.P + 2] = True
    layer = _layer(table, readout, output_gate=output_gate, qk_norm=qk_norm)
    x = torch.randn(2, 3, 12, requires_grad=True)
    reads = []
    y = layer(x, on_read=reads.append)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    got = _grads(layer)
    got_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None

    y_ref, ids_ref, V, Kf = dense_reference(layer, table, x)
    (y_ref * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    want = _grads(layer)

    (read,) = reads
    assert torch.equal(read.ids.reshape(-1, layer.k).sort(-1).values, ids_ref.sort(-1).values)
    assert not torch.isin(read.ids, torch.nonzero(table.ablated).flatten()).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and {"wq.weight", "codebook_a", "codebook_b"} <= got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(table.value_grad, V.grad, rtol=1e-5, atol=1e-6)
    if n_flat:
        assert Kf.grad.abs().sum() > 0
        torch.testing.assert_close(table.key_grad, Kf.grad, rtol=1e-5, atol=1e-6)


def test_pushdown_equals_fetch(tensor_table):
    outs = {}
    for mode in ("pushdown", "fetch"):
        table = tensor_table(8, 6, 6, 10)
        layer = _layer(table, mode)
        x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(1))
        y = layer(x)
        y.square().sum().backward()
        outs[mode] = (y.detach(), _grads(layer), table.value_grad.clone(), table.key_grad.clone())
    (y0, g0, v0, k0), (y1, g1, v1, k1) = outs["pushdown"], outs["fetch"]
    torch.testing.assert_close(y0, y1, rtol=1e-6, atol=1e-7)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v0, v1)
    torch.testing.assert_close(k0, k1)


def test_subkey_bias_moves_against_load(tensor_table):
    table = tensor_table(8, 6, 6)
    layer = _layer(table, bias_update_rate=0.01)
    layer.bias_a.zero_()
    layer.bias_b.zero_()
    layer.train()
    layer(torch.randn(4, 8, 12))
    load_a = layer.load_a.clone()
    assert load_a.sum() == 4 * 8 * layer.n_heads * layer.k
    layer.update_bias()
    expected = 0.01 * torch.sign(load_a.mean() - load_a)
    torch.testing.assert_close(layer.bias_a, expected)
    assert layer.load_a.sum() == 0


def test_load_counting_and_bias_update_read_nothing_back(tensor_table, host_waits):
    """The sub-key loads count the product rows among the selected ids (flat rows and padding
    left out) as bincount does, and neither counting nor the bias update reads a value back
    from the device (on a GPU each read made the host wait for the step's kernels)."""
    table = tensor_table(8, 6, 6, n_flat=5)
    layer = _layer(table, bias_update_rate=0.01)
    n = layer.n
    ids = torch.randint(-1, n * n + 5, (40, layer.k), generator=torch.Generator().manual_seed(1))
    bias_a = layer.bias_a.clone()
    with host_waits() as waits:
        layer._count_load(*layer._product_parts(ids))
        load_a, load_b = layer.load_a.clone(), layer.load_b.clone()
        layer.update_bias()
        layer.update_bias()          # nothing selected since: the biases stay, bit for bit
    assert waits.count == 0, waits.ops
    prod = ids[(ids >= 0) & (ids < n * n)]
    assert torch.equal(load_a, torch.bincount(prod // n, minlength=n).float())
    assert torch.equal(load_b, torch.bincount(prod % n, minlength=n).float())
    assert torch.equal(layer.bias_a, bias_a + 0.01 * torch.sign(load_a.mean() - load_a))


@pytest.mark.parametrize("readout", ["pushdown", "fetch", "auto"])
def test_per_call_options_override_the_layer_and_leave_it_unchanged(readout, tensor_table):
    """options=ReadOptions(k, readout) reads k rows by that path for one call: the dense
    reference with k rows, for every path; the layer's own k and config are untouched."""
    table = tensor_table(8, 6, 6, 20)
    layer = _layer(table, "pushdown")
    x = torch.randn(2, 3, 12)
    reads = []
    with torch.no_grad():
        y = layer(x, options=ReadOptions(k=2, readout=readout), on_read=reads.append)
        y_ref, ids_ref, _, _ = dense_reference(layer, table, x, k=2)
    assert reads[0].ids.shape == (2, 3, layer.n_heads, 2)
    assert torch.equal(reads[0].ids.reshape(-1, 2).sort(-1).values, ids_ref.sort(-1).values)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert layer.k == 5 and layer.cfg.readout == "pushdown"
    with pytest.raises(ValueError, match="readout mode"):
        ReadOptions(readout="remote")


def test_fetch_thread_belongs_to_the_layer(tensor_table):
    layer = _layer(tensor_table(8, 6, 6, 10), "fetch")
    layer(torch.randn(1, 2, 12))
    pool = layer._fetcher
    assert pool is not None
    layer.close()
    assert layer._fetcher is None and pool._shutdown
    layer(torch.randn(1, 2, 12))                       # a later call starts a new one
    assert layer._fetcher is not None and layer._fetcher is not pool
