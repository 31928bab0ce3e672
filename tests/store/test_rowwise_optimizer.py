"""Row-wise optimizers (rowwise_adagrad, rowwise_adam) against dense references on the rows
they touch; their state through snapshots; the "auto" default and what it costs."""
import pytest
import torch

from store_service import errors, persistence, versions
from store_service.config import OptimizerConfig, TableConfig
from store_service.optimizer import (LARGE_TABLE_VALUE_BYTES, RowState, optimizer_overhead, resolve_kind,
                                     sparse_step)
from store_service.table import Table


def _schedule(num_rows=12, dim=6, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        rows = torch.randperm(num_rows, generator=g)[: num_rows // 3].sort().values
        out.append((rows, torch.randn(rows.numel(), dim, generator=g)))
    return out


def _dense_reference(kind, init, sched, lr, b2=0.999, eps=1e-8):
    """Literal per-row loops over a dense [R, d] table: what each kind means."""
    p = init.clone().double()
    acc = torch.zeros(init.shape[0], dtype=torch.float64)
    v = torch.zeros(init.shape[0], dtype=torch.float64)
    t = torch.zeros(init.shape[0], dtype=torch.int64)
    for rows, grads in sched:
        for r, g in zip(rows.tolist(), grads.double()):
            t[r] += 1
            ms = float((g * g).mean())
            if kind == "rowwise_adagrad":
                acc[r] += ms
                p[r] -= lr * g / (acc[r].sqrt() + eps)
            else:
                v[r] = b2 * v[r] + (1 - b2) * ms
                p[r] -= lr * g / ((v[r] / (1 - b2 ** int(t[r]))).sqrt() + eps)
    return p, acc, v, t


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "rowwise_adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_matches_dense_reference_and_leaves_other_rows(kind, dtype):
    init = torch.randn(12, 6).to(dtype)
    param, state = init.clone(), RowState.zeros(kind, 12, 6)
    sched = _schedule()
    for rows, grads in sched:
        sparse_step(kind, param, state, rows, grads, lr=0.05, betas=(0.9, 0.99) if kind == "rowwise_adam" else
                    (0.9, 0.999))
    p, acc, v, t = _dense_reference(kind, init.float(), sched, 0.05, b2=0.99 if kind == "rowwise_adam" else 0.999)
    touched = torch.unique(torch.cat([r for r, _ in sched]))
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[touched] = False
    assert bool(untouched.any())
    assert torch.equal(param[untouched], init[untouched])          # bitwise
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(param[touched].float(), p[touched].float(), **tol)
    assert torch.equal(state.steps, t)
    if kind == "rowwise_adagrad":
        torch.testing.assert_close(state.acc, acc.float(), atol=1e-6, rtol=1e-5)
        assert state.row_v is None and state.m is None
    else:
        torch.testing.assert_close(state.row_v, v.float(), atol=1e-7, rtol=1e-5)
        assert state.acc is None and state.m is None
    assert state.nbytes() == 12 * (8 + 4)


def test_rowwise_frozen_rows_and_state_untouched():
    for kind in ("rowwise_adagrad", "rowwise_adam"):
        init = torch.randn(8, 4)
        param, state = init.clone(), RowState.zeros(kind, 8, 4)
        frozen = torch.zeros(8, dtype=torch.bool)
        frozen[[2, 6]] = True
        sparse_step(kind, param, state, torch.arange(8), torch.randn(8, 4), lr=0.1, frozen=frozen)
        assert torch.equal(param[frozen], init[frozen]) and not bool(state.steps[frozen].any())
        assert not bool(param[~frozen].eq(init[~frozen]).all(1).any())


def test_auto_default_by_table_size():
    small = TableConfig(d_k=8, d_v=16, segments=[("flat", 100)])
    assert small.optimizer.kind == "adam"
    rows = LARGE_TABLE_VALUE_BYTES // (1024 * 2)
    assert TableConfig(d_k=8, d_v=1024, segments=[("flat", rows)], value_dtype="bfloat16").optimizer.kind \
        == "rowwise_adam"
    assert TableConfig(d_k=8, d_v=1024, segments=[("flat", rows - 1)], value_dtype="bfloat16").optimizer.kind \
        == "adam"
    explicit = OptimizerConfig(kind="sgd")
    assert resolve_kind(explicit, 10**9, 1024, "bfloat16") is explicit
    # the large-table default costs at most 15% of the values' bytes (steps included)
    for d_v in (64, 256, 1024, 4096):
        assert optimizer_overhead("rowwise_adam", d_v, "bfloat16") <= 0.15
    assert optimizer_overhead("rowwise_adam", 1024, "bfloat16") == 12 / 2048
    assert optimizer_overhead("adam", 1024, "bfloat16") > 4
    with pytest.raises(errors.InvalidArgument):
        OptimizerConfig(kind="lion")


def _train(table, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = table.info().num_rows
    for s in range(steps):
        ids = torch.randint(0, n, (5, 3), generator=g)
        w = torch.rand(5, 3, generator=g)
        table.readout_backward(ids, w, torch.randn(5, table.info().d_v, generator=g))
        table.end_step(s)


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "rowwise_adam", "sgd"])
def test_state_through_snapshot_and_repartition(tmp_path, kind):
    cfg = TableConfig(d_k=8, d_v=16, segments=[("product", 8), ("flat", 40)], num_shards=2, bias_step=0.0,
                      value_dtype="bfloat16", optimizer=OptimizerConfig(kind=kind, lr=0.1))
    t = Table.create(cfg, str(tmp_path))
    _train(t)
    v = t.snapshot()
    arrays = persistence.read_shard(persistence.version_path(str(tmp_path), v), 0).arrays
    if kind != "sgd":
        name = "opt_acc" if kind == "rowwise_adagrad" else "opt_row_v"
        assert name in arrays and arrays[name].shape == (t.shards[0].memory()["rows"],)
        assert "opt_m" not in arrays
    # a reopened table (and one re-partitioned to 3 shards) continues exactly as the live one
    reopened = Table.open(str(tmp_path), v)
    v3 = versions.repartition(str(tmp_path), v, 3)
    three = Table.open(str(tmp_path), v3)
    for other in (reopened, three):
        assert torch.equal(torch.cat([s.state_dict()["opt_steps"] for s in other.shards]),
                           torch.cat([s.state_dict()["opt_steps"] for s in t.shards]))
    for table in (t, reopened, three):
        _train(table, steps=3, seed=1)
    all_ids = torch.arange(cfg.num_rows)
    assert torch.equal(reopened.fetch(all_ids), t.fetch(all_ids))
    assert torch.equal(three.fetch(all_ids), t.fetch(all_ids))


def test_switching_kinds_keeps_other_state_and_old_stores_load(tmp_path):
    cfg = TableConfig(d_k=8, d_v=16, segments=[("flat", 40)], bias_step=0.0,
                      optimizer=OptimizerConfig(kind="adam", lr=0.1))
    t = Table.create(cfg, str(tmp_path))
    _train(t, steps=2)
    old = t.set_optimizer(OptimizerConfig(kind="rowwise_adagrad", lr=0.1))
    assert old.optimizer.kind == "adam"
    _train(t, steps=2, seed=3)
    st = t.shards[0]._serving
    assert st.opt.m is not None and st.opt.acc is not None and st.key_opt.acc is not None
    # "auto" on a small table resolves to adam
    assert t.set_optimizer(OptimizerConfig(kind="auto", lr=0.1)).optimizer.kind == "rowwise_adagrad"
    assert st.config.optimizer.kind == "adam"
    v = t.snapshot()
    names = set(persistence.read_shard(persistence.version_path(str(tmp_path), v), 0).arrays)
    assert {"opt_m", "opt_v", "opt_acc", "key_acc", "opt_steps"} <= names
    back = Table.open(str(tmp_path), v)
    assert torch.equal(back.shards[0].state_dict()["opt_acc"], t.shards[0].state_dict()["opt_acc"])


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "rowwise_adam"])
def test_remote_set_optimizer_trains_as_in_process(tmp_path, kind):
    """set_optimizer over gRPC to a row-wise kind, then training: rows equal the in-process table's."""
    from store_service.testing import served_table
    cfg = TableConfig(d_k=8, d_v=16, segments=[("product", 8), ("flat", 40)], num_shards=2, bias_step=0.0,
                      optimizer=OptimizerConfig(kind="adam", lr=0.1))
    v = Table.create(cfg, str(tmp_path)).snapshot()
    local = Table.open(str(tmp_path), v)
    with served_table(str(tmp_path), v) as remote:
        for t in (local, remote):
            assert t.set_optimizer(OptimizerConfig(kind=kind, lr=0.2)).optimizer.kind == "adam"
            _train(t, steps=3, seed=4)
        ids = torch.arange(cfg.num_rows)
        assert torch.equal(remote.fetch(ids), local.fetch(ids))
        assert remote.set_optimizer(OptimizerConfig(kind="auto", lr=0.2)).optimizer.kind == kind


@pytest.mark.parametrize("kind", ["sgd", "adam", "rowwise_adagrad", "rowwise_adam"])
def test_untouched_rows_and_their_state_bitwise_unchanged(kind):
    init = torch.randn(10, 5).to(torch.bfloat16)
    param, state = init.clone(), RowState.zeros(kind, 10, 5)
    sparse_step(kind, param, state, torch.tensor([1, 4]), torch.randn(2, 5), lr=0.1)
    before = {n: t.clone() for n, t in state.tensors().items()}
    snapshot = param.clone()
    sparse_step(kind, param, state, torch.tensor([4, 7]), torch.randn(2, 5), lr=0.1)
    untouched = torch.tensor([0, 1, 2, 3, 5, 6, 8, 9])
    assert torch.equal(param[untouched], snapshot[untouched])
    for name, t in state.tensors().items():
        assert torch.equal(t[untouched], before[name][untouched]), name
    assert not torch.equal(param[7], init[7])
