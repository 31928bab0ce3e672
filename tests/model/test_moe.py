"""MoE: sort-based dispatch equals a per-token loop; loss-free balancing moves
the bias against the load; the aux loss and load reporting work."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_worker.config import preset
from model_worker.moe import MoE


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per selected expert: the obvious loop."""
    B, S, D = x.shape
    xf = x.reshape(-1, D)
    out = torch.zeros_like(xf)
    E = moe.experts
    for t in range(xf.shape[0]):
        logits = moe.router.proj(xf[t])
        s = torch.sigmoid(logits) if moe.router.score_func == "sigmoid" else torch.softmax(logits, -1)
        top = torch.topk(s + moe.router.expert_bias, moe.n_active).indices
        g = s[top]
        if moe.router.route_norm:
            g = g / g.sum()
        for e, ge in zip(top.tolist(), g):
            xe = xf[t]
            out[t] += ge * ((F.silu(xe @ E.w1[e]) * (xe @ E.w3[e])) @ E.w2[e])
        if moe.shared is not None:
            out[t] += moe.shared(xf[t])
    return out.view(B, S, D)


@pytest.mark.parametrize("router,norm", [("sigmoid", True), ("softmax", False), ("softmax", True)])
def test_dispatch_matches_per_token_loop(router, norm):
    torch.manual_seed(0)
    cfg = preset("tiny-moe", router=router, route_norm=norm, n_experts=6, n_active=3)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.expert_bias.normal_(0, 0.05)
    x = torch.randn(2, 7, cfg.d_model, requires_grad=True)
    y = moe(x)
    y.square().sum().backward()
    g_fast = {n: p.grad.clone() for n, p in moe.named_parameters()}
    gx = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    y_ref = naive_moe(moe, x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_loss_free_bias_moves_against_load():
    torch.manual_seed(0)
    cfg = preset("tiny-moe", n_experts=4, n_active=1, moe_bias_rate=0.01)
    moe = MoE(cfg).train()
    with torch.no_grad():  # make expert 0 hot
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[0] = 1.0
    x = torch.rand(2, 16, cfg.d_model)  # positive inputs: expert 0 wins every token
    moe(x)
    load = moe.update_bias()
    assert load.tolist() == [32, 0, 0, 0] and moe.last_load.tolist() == load.tolist()
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert moe.load.sum() == 0
    # with varied tokens, repeated steps spread the load of a skewed router
    with torch.no_grad():
        moe.router.proj.weight.normal_(0, 0.1)
        moe.router.proj.weight[0] += 0.3
        moe.router.expert_bias.zero_()
    x = torch.rand(4, 32, cfg.d_model)
    moe(x)
    before = moe.update_bias().max()
    loads = []
    for _ in range(200):
        moe(x)
        loads.append(moe.update_bias().max())
    assert before == 128 and max(loads[-20:]) < 0.5 * before


def test_padded_step_reads_back_only_the_block_size(host_waits):
    """A training forward on the padded path and the bias update read one value back from the
    device (the padded block's size; on a GPU each read makes the host wait), not bincount's
    min and max nor the load's sum; the counts equal bincount's, and a step without tokens
    leaves the bias bit for bit."""
    torch.manual_seed(0)
    cfg = preset("tiny-moe", n_experts=4, n_active=2, moe_bias_rate=0.01)
    moe = MoE(cfg).train()
    moe.experts.mode = "padded"
    x = torch.randn(2, 16, cfg.d_model)
    top = moe.router(x.reshape(-1, cfg.d_model))[1]         # the experts this step routes to
    with host_waits() as waits:
        moe(x)
        load = moe.update_bias()
        bias = moe.router.expert_bias.clone()
        moe.update_bias()
    assert waits.ops == {"_local_scalar_dense": 1}
    assert torch.equal(load, torch.bincount(top.reshape(-1), minlength=4).float())
    assert torch.equal(moe.router.expert_bias, bias)


def test_padded_running_count_scans_along_the_last_dim():
    """The padded path's running count per expert is a cumsum over the M = T*K pairs. Down
    dim 0 of an [M, E] tensor CUDA runs it one thread per column through all M rows: 46 of an
    82 ms knowledge step on the H100 (CAPACITY_NOTES). Every cumsum of the forward must scan a
    tensor's last dim."""
    torch.manual_seed(0)
    cfg = preset("tiny-moe", n_experts=4, n_active=2)
    moe = MoE(cfg).train()
    moe.experts.mode = "padded"
    scans = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.cumsum, torch.Tensor.cumsum):
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                scans.append((args[0].dim(), dim % args[0].dim()))
            return func(*args, **kwargs)

    with Record():
        moe(torch.randn(2, 16, cfg.d_model))
    assert scans and all(dim == ndim - 1 for ndim, dim in scans), scans


def test_bias_affects_selection_not_routing_weights():
    torch.manual_seed(0)
    cfg = preset("tiny-moe", n_experts=4, n_active=2)
    moe = MoE(cfg)
    x = torch.randn(5, cfg.d_model)
    s0, i0, g0 = moe.router(x)
    moe.router.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    s1, i1, g1 = moe.router(x)
    assert (i1.sort(-1).values == torch.tensor([0, 1])).all()
    torch.testing.assert_close(s0, s1)
    want = s1.gather(-1, i1)
    torch.testing.assert_close(g1, want / want.sum(-1, keepdim=True))


def test_aux_loss():
    cfg = preset("tiny-moe", aux_loss_coef=1e-2)
    moe = MoE(cfg).train()
    moe(torch.randn(2, 5, cfg.d_model))
    assert moe.aux_loss.requires_grad and moe.aux_loss.item() > 0


def _path_and_loop(experts, counts: list[int], d_model: int, k: int = 1):
    """Outputs and gradients (input's, each expert weight's, then the routing weights') of
    `experts` on tokens whose k (token, slot) pairs go to expert e counts[e] times (in no
    particular order), and the same from its loop path: -> (y, grads, y_loop, grads_loop)."""
    pairs = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    top_idx = pairs[torch.randperm(pairs.numel())].view(-1, k)
    x = torch.randn(top_idx.shape[0], d_model, requires_grad=True)
    weights = torch.rand(top_idx.shape, requires_grad=True)
    runs = []
    path = experts.mode, experts.grouped_bf16
    for mode, grouped in (path, ("loop", False)):
        experts.mode, experts.grouped_bf16 = mode, grouped
        x.grad = weights.grad = None
        experts.zero_grad()
        y, got_counts = experts(x, top_idx, weights)
        assert got_counts.tolist() == counts
        y.square().sum().backward()
        runs.append((y.detach(), [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
                     + [weights.grad.clone()]))
    experts.mode, experts.grouped_bf16 = path
    return (*runs[0], *runs[1])


@pytest.mark.parametrize("counts,k", [([3, 0, 5, 1], 1), ([0, 0, 9, 0], 1), ([2, 2, 2, 2], 1), ([0, 4, 0, 0], 1),
                                      ([3, 0, 5, 2], 2), ([2, 2, 2, 3], 3)])
def test_padded_experts_equal_the_loop(counts, k):
    """The batched, padded expert path gives the loop's outputs and gradients (the input's,
    the experts' and the routing weights'), with empty experts, with skewed routing, and with
    several experts per token."""
    from model_worker.moe import RoutedExperts
    torch.manual_seed(0)
    y, got, y_ref, want = _path_and_loop(RoutedExperts(4, 8, 12, std=0.3, mode="padded"), counts, 8, k)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_which_path_the_experts_take(monkeypatch):
    """auto: padded on a GPU unless the padding passes max_padding x the rows, the loop on
    the CPU (bit for bit the earlier CPU results); padded / loop force one path."""
    from model_worker.moe import RoutedExperts
    auto = RoutedExperts(4, 8, 12)
    assert auto.use_padded(True, E=4, cap=3, M=10) and auto.use_padded(True, E=4, cap=10, M=10)
    assert not auto.use_padded(True, E=4, cap=11, M=10)          # 44 > 4 x 10: the loop
    assert not auto.use_padded(False, E=4, cap=3, M=10)          # the CPU: the loop
    assert RoutedExperts(4, 8, 12, mode="padded").use_padded(False, 4, 40, 10)
    assert not RoutedExperts(4, 8, 12, mode="loop").use_padded(True, 4, 3, 10)
    with pytest.raises(ValueError, match="mode"):
        RoutedExperts(4, 8, 12, mode="fast")
    # on the CPU, auto runs the loop and never builds the padded block
    monkeypatch.setattr(torch, "bmm", lambda *a: pytest.fail("took the padded path"))
    top_idx = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 2, 3, 2])).view(-1, 1)
    auto(torch.randn(10, 8), top_idx, torch.ones(10, 1))


@pytest.mark.parametrize("counts", [[3, 0, 5, 8], [0, 16, 0, 0]])
def test_grouped_bf16_experts_are_close_to_the_loop(counts):
    """The opt-in bf16 grouped GEMMs agree with the fp32 loop to bf16 precision, outputs and
    gradients (torch's CPU fallback runs the same op as the GPU kernel's contract)."""
    from model_worker.moe import RoutedExperts
    torch.manual_seed(0)
    y, got, y_ref, want = _path_and_loop(RoutedExperts(4, 16, 24, std=0.3, grouped_bf16=True), counts, 16)
    assert y.dtype == torch.float32

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert rel(y, y_ref) < 2e-2
    for g, w in zip(got, want):
        assert rel(g, w) < 3e-2
    # the empty experts' weights get exactly no gradient
    for e in (i for i, n in enumerate(counts) if n == 0):
        assert got[1][e].abs().max() == 0 and got[3][e].abs().max() == 0


def test_moe_built_with_grouped_bf16_runs_and_trains():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="multiples of 8"):
        MoE(preset("tiny-moe", moe_grouped_bf16=True))           # d_expert 26
    cfg = preset("tiny-moe", moe_grouped_bf16=True, d_expert=24)
    moe = MoE(cfg)
    x = torch.randn(2, 5, cfg.d_model, requires_grad=True)
    moe(x).square().sum().backward()
    assert moe.experts.w1.grad is not None and torch.isfinite(moe.experts.w1.grad).all()
