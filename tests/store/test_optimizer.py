"""Row-wise sparse SGD / Adam against dense torch.optim on the rows they touch; switching a
live table's row optimizer (set_optimizer)."""
import pytest
import torch

from store_service import errors, persistence
from store_service.config import OptimizerConfig, RowOptimizer, TableConfig
from store_service.optimizer import RowState, sparse_step
from store_service.table import Table


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


# -- switching a live table's row optimizer (set_optimizer) --------------------------------

def _table_cfg(kind: str, **kw):
    base = dict(d_k=8, d_v=16, segments=[("product", 4), ("flat", 30)], store_codebooks=True, num_shards=2,
                bias_step=0.0, optimizer=OptimizerConfig(kind, lr=0.05))
    base.update(kw)
    return TableConfig(**base)


def _steps(table, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 46, (6, 4), generator=gen)
        w = torch.rand(6, 4, generator=gen)
        table.readout(ids, w)
        table.readout_backward(ids, w, torch.randn(6, 16, generator=gen))
        table.accumulate_key_grads(torch.tensor([16, 30, 45]), torch.randn(3, 8, generator=gen))
        table.end_step(table.info().step)


def _states(table):
    return [sh.state_dict() for sh in table.shards]


def test_set_optimizer_switches_a_table_to_adam_and_back(tmp_path):
    sgd, adam = Table.create(_table_cfg("sgd"), str(tmp_path)), Table.create(_table_cfg("adam"))
    assert "opt_m" not in _states(sgd)[0]                       # an SGD table keeps no Adam state
    old = sgd.set_optimizer(OptimizerConfig("adam", lr=0.05), bias_step=0.01)
    assert old == RowOptimizer(OptimizerConfig("sgd", lr=0.05), 0.0)
    for st in _states(sgd):                                     # allocated, zeros
        for name in ("opt_m", "opt_v", "key_m", "key_v"):
            assert not bool(st[name].any()), name
    adam.set_optimizer(OptimizerConfig("adam", lr=0.05), bias_step=0.01)   # same settings, state kept
    _steps(sgd, 2)
    _steps(adam, 2)
    for a, b in zip(_states(sgd), _states(adam)):               # the switched table steps as an Adam table
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert bool(_states(sgd)[1]["flat_bias"].any())              # the balancing step it was given

    back = sgd.set_optimizer(old.optimizer, bias_step=old.bias_step)       # restored
    assert back == RowOptimizer(OptimizerConfig("adam", lr=0.05), 0.01)
    root = persistence.read_root_attrs(str(tmp_path), sgd.snapshot())
    assert root["optimizer"]["kind"] == "sgd" and root["config"]["bias_step"] == 0.0
    before = _states(sgd)
    _steps(sgd, 1, seed=4)                                      # an SGD step again: Adam state untouched
    after = _states(sgd)
    assert all(torch.equal(a["opt_m"], b["opt_m"]) for a, b in zip(before, after))
    assert any(not torch.equal(a["values"], b["values"]) for a, b in zip(before, after))

    for bad, field in ((("adam",), "optimizer"), ((OptimizerConfig("sgd"),), "bias_step")):
        with pytest.raises(errors.InvalidArgument) as e:
            sgd.set_optimizer(*bad, bias_step=-1.0 if field == "bias_step" else None)
        assert e.value.field == field
    with pytest.raises(errors.InvalidArgument) as e:
        OptimizerConfig("adam", eps=0.0)
    assert e.value.field == "optimizer.eps"
