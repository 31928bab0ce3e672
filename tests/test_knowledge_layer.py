"""The knowledge layer against a dense reference that holds the whole table in
tensors: same selection, same output, same gradients to q (W_q), the codebooks,
the values and the flat keys; pushdown == fetch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from store_service import kernels
from store_service.interface import (SEGMENT_FLAT, SEGMENT_PRODUCT, SearchResult, SegmentInfo,
                                     ShardInfo, TableInfo, UsageStats)
from model_worker.config import KnowledgeConfig
from model_worker.knowledge_layer import KnowledgeLayer


class TensorTable:
    """A KnowledgeTable held in plain tensors: product rows [0, n^2) then flat
    rows. Row and key gradients are accumulated in `value_grad` / `key_grad`."""

    def __init__(self, d_k: int, d_v: int, n_sub: int, n_flat: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d_k, self.d_v, self.n_sub, self.n_flat = d_k, d_v, n_sub, n_flat
        self.P = n_sub * n_sub
        self.N = self.P + n_flat
        self.values = torch.randn(self.N, d_v, generator=g)
        self.flat_keys = torch.randn(n_flat, d_k, generator=g)
        self.flat_bias = torch.randn(n_flat, generator=g) * 0.01
        self.ablated = torch.zeros(self.N, dtype=torch.bool)
        self.value_grad = torch.zeros_like(self.values)
        self.key_grad = torch.zeros_like(self.flat_keys)

    def info(self) -> TableInfo:
        segs = [SegmentInfo(SEGMENT_PRODUCT, 0, self.P, self.n_sub)]
        if self.n_flat:
            segs.append(SegmentInfo(SEGMENT_FLAT, self.P, self.n_flat))
        return TableInfo(self.d_k, self.d_v, self.N, "float32", tuple(segs), (ShardInfo(0, 0, self.N, 1, 0),))

    def search(self, queries, k):
        s = queries @ self.flat_keys.T + self.flat_bias
        s = s.masked_fill(self.ablated[self.P:], float("-inf"))
        scores, idx = s.topk(min(k, self.n_flat), dim=-1)
        return SearchResult(idx + self.P, scores, self.flat_keys[idx])

    def fetch(self, ids, *, hits=None, weight_sum=None):
        return self.values[ids]

    def readout(self, ids, weights):
        return kernels.readout_weighted(self.values, ids, weights)

    def readout_backward(self, ids, weights, grad_out, *, request_id=""):
        gw, uniq, rg = kernels.readout_weighted_backward(self.values, ids, weights, grad_out)
        self.value_grad.index_add_(0, uniq, rg)
        return gw

    def accumulate_key_grads(self, ids, grads, *, request_id=""):
        self.key_grad.index_add_(0, ids - self.P, grads)

    def accumulate_value_grads(self, ids, grads, *, request_id=""):
        self.value_grad.index_add_(0, ids, grads)

    def usage(self):
        z = torch.zeros(self.N)
        return UsageStats(z.long(), z.double(), torch.zeros(self.N, dtype=torch.bool), self.ablated.clone())

    def end_step(self, step, **kw):
        return step + 1


def dense_reference(layer: KnowledgeLayer, table: TensorTable, x: torch.Tensor):
    """The layer's math with every key and value a leaf tensor -> (y, ids, V, Kf)."""
    B, S, D = x.shape
    h, k, n, P = layer.n_heads, layer.k, layer.n, table.P
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
@pytest.mark.parametrize("gate,qk_norm", [(True, True), (False, False)])
def test_forward_backward_matches_dense_reference(n_flat, readout, gate, qk_norm):
    table = TensorTable(8, 6, 6, n_flat)
    table.ablated[[3, 7, 30]] = True
    if n_flat:
        table.ablated[table.P + 2] = True
    layer = _layer(table, readout, gate=gate, qk_norm=qk_norm)
    x = torch.randn(2, 3, 12, requires_grad=True)
    layer.record = True
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    got = _grads(layer)
    got_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None

    y_ref, ids_ref, V, Kf = dense_reference(layer, table, x)
    (y_ref * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    want = _grads(layer)

    assert torch.equal(layer.last_ids.reshape(-1, layer.k).sort(-1).values, ids_ref.sort(-1).values)
    assert not torch.isin(layer.last_ids, torch.nonzero(table.ablated).flatten()).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and {"wq.weight", "codebook_a", "codebook_b"} <= got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(table.value_grad, V.grad, rtol=1e-5, atol=1e-6)
    if n_flat:
        assert Kf.grad.abs().sum() > 0
        torch.testing.assert_close(table.key_grad, Kf.grad, rtol=1e-5, atol=1e-6)


def test_pushdown_equals_fetch():
    outs = {}
    for mode in ("pushdown", "fetch"):
        table = TensorTable(8, 6, 6, 10)
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


def test_subkey_bias_moves_against_load():
    table = TensorTable(8, 6, 6)
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
