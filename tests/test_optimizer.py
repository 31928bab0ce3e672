"""Row-wise sparse SGD / Adam against dense torch.optim on the rows they touch."""
import torch

from store_service.optimizer import RowState, sparse_step


def _schedule(num_rows=10, dim=6, steps=5, seed=0):
    """Per step: unique touched rows and their grads."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        rows = torch.randperm(num_rows, generator=g)[: num_rows // 2].sort().values
        out.append((rows, torch.randn(rows.numel(), dim, generator=g)))
    return out


def test_sgd_matches_torch_sgd_bitwise():
    init = torch.randn(10, 6)
    param, state = init.clone(), RowState.zeros("sgd", 10, 6)
    dense = torch.nn.Parameter(init.clone())
    ref = torch.optim.SGD([dense], lr=0.1)
    for rows, grads in _schedule():
        sparse_step("sgd", param, state, rows, grads, lr=0.1)
        g = torch.zeros(10, 6)
        g[rows] = grads
        dense.grad = g
        ref.step()
    assert torch.equal(param, dense.detach())


def test_adam_rows_touched_every_step_match_dense_adam():
    init = torch.randn(4, 6)
    param, state = init.clone(), RowState.zeros("adam", 4, 6)
    dense = torch.nn.Parameter(init.clone())
    ref = torch.optim.Adam([dense], lr=0.01, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = torch.randn(4, 6, generator=gen)
        sparse_step("adam", param, state, torch.arange(4), grads, lr=0.01, betas=(0.9, 0.99))
        dense.grad = grads.clone()
        ref.step()
    torch.testing.assert_close(param, dense.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state.m, ref.state[dense]["exp_avg"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(state.v, ref.state[dense]["exp_avg_sq"], atol=1e-7, rtol=1e-6)
    assert bool((state.steps == 6).all())


def test_adam_is_per_row():
    """Each row follows dense Adam run on that row alone with only the steps it got a gradient."""
    init = torch.randn(10, 6)
    param, state = init.clone(), RowState.zeros("adam", 10, 6)
    sched = _schedule(steps=7, seed=2)
    for rows, grads in sched:
        sparse_step("adam", param, state, rows, grads, lr=0.05)
    for r in range(10):
        p = torch.nn.Parameter(init[r].clone())
        ref = torch.optim.Adam([p], lr=0.05, foreach=False)
        n = 0
        for rows, grads in sched:
            hit = (rows == r).nonzero()
            if hit.numel():
                p.grad = grads[hit[0, 0]].clone()
                ref.step()
                n += 1
        torch.testing.assert_close(param[r], p.detach(), atol=1e-6, rtol=1e-6)
        assert int(state.steps[r]) == n


def test_frozen_rows_and_their_state_untouched():
    init = torch.randn(8, 4)
    param, state = init.clone(), RowState.zeros("adam", 8, 4)
    frozen = torch.zeros(8, dtype=torch.bool)
    frozen[[1, 5]] = True
    sparse_step("adam", param, state, torch.arange(8), torch.randn(8, 4), lr=0.1, frozen=frozen)
    assert torch.equal(param[frozen], init[frozen])
    assert not bool(torch.isclose(param[~frozen], init[~frozen]).all(1).any())
    assert bool((state.m[frozen] == 0).all()) and bool((state.steps[frozen] == 0).all())
    assert bool((state.steps[~frozen] == 1).all())


def test_bf16_params_update_in_fp32_and_round():
    init = torch.randn(5, 4).bfloat16()
    param, state = init.clone(), RowState.zeros("sgd", 5, 4)
    grads = torch.randn(2, 4)
    sparse_step("sgd", param, state, torch.tensor([0, 3]), grads, lr=0.5)
    assert param.dtype == torch.bfloat16
    assert torch.equal(param[[0, 3]], (init[[0, 3]].float() - 0.5 * grads).bfloat16())
    assert torch.equal(param[[1, 2, 4]], init[[1, 2, 4]])
