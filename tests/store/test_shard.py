"""One Shard without gRPC: search, readout, gradients, barrier, edits, versions, validation."""
import threading

import pytest
import torch

from store_service import errors, kernels
from store_service.config import OptimizerConfig, TableConfig
from store_service.row_requests import record_readout_usage
from store_service.shard import BarrierTimeout, Shard


def _cfg(**kw):
    base = dict(d_k=8, d_v=16, segments=[("product", 6), ("flat", 40)], store_codebooks=True,
                num_shards=3, bias_step=0.0, optimizer=OptimizerConfig("adam", lr=0.01))
    base.update(kw)
    return TableConfig(**base)


def _dense_keys(shard: Shard, cfg: TableConfig):
    """Brute-force view of what this shard searches: global ids, keys [N, d_k], bias [N]."""
    sd = shard.state_dict()
    d = shard.describe()
    ids, keys, bias = [sd["flat_ids"]], [sd["keys"]], [sd["flat_bias"]]
    for si, seg in enumerate(d.segments):
        if f"pk{si}_codebook_a" not in sd:
            continue
        n = seg.n_sub
        lo = max(d.info.row_start, seg.row_start)
        hi = min(d.info.row_end, seg.row_end)
        g = torch.arange(lo, hi)
        i, j = (g - seg.row_start) // n, (g - seg.row_start) % n
        ids.append(g)
        keys.append(torch.cat([sd[f"pk{si}_codebook_a"][i], sd[f"pk{si}_codebook_b"][j]], 1))
        bias.append(sd[f"pk{si}_bias_a"][i] + sd[f"pk{si}_bias_b"][j])
    return torch.cat(ids), torch.cat(keys), torch.cat(bias)


def _brute_search(shard, cfg, q, k):
    ids, keys, bias = _dense_keys(shard, cfg)
    s = q @ keys.T + bias
    ablated = shard.usage().ablated[ids - shard.describe().info.row_start]
    s = s.masked_fill(ablated, float("-inf"))
    top, pos = s.topk(k, dim=1)
    return top, ids[pos].masked_fill(torch.isneginf(top), -1)


@pytest.mark.parametrize("shard_id", [0, 1, 2])
def test_search_matches_brute_force_with_bias_and_ablation(shard_id):
    cfg = _cfg()
    sh = Shard(cfg, shard_id)
    info = sh.describe().info
    # non-zero biases: flat rows and sub-keys
    st = sh._serving
    st.flat_bias += torch.randn_like(st.flat_bias) * 0.3
    for pc in st.pieces:
        pc.bias_a += torch.randn_like(pc.bias_a) * 0.3
        pc.bias_b += torch.randn_like(pc.bias_b) * 0.3
    q = torch.randn(7, 8)
    k = 5
    res = sh.search(q, k)
    sh.set_ablated(res.ids[:, :2].flatten().unique())
    res2 = sh.search(q, k, want_keys=True)
    top, ids = _brute_search(sh, cfg, q, k)
    assert torch.equal(res2.ids, ids)
    torch.testing.assert_close(res2.scores, top)
    assert not bool(torch.isin(res2.ids, res.ids[:, :2].contiguous()).any())
    assert bool(((res2.ids >= info.row_start) & (res2.ids < info.row_end)).all())
    # keys are those of the returned rows
    gids, keys, _ = _dense_keys(sh, cfg)
    lookup = {int(g): r for r, g in enumerate(gids)}
    want = keys[torch.tensor([[lookup[int(i)] for i in row] for row in res2.ids])]
    torch.testing.assert_close(res2.keys, want)


def test_search_pads_when_fewer_selectable_rows_and_rejects_k_above_rows():
    cfg = _cfg(segments=[("flat", 6)], num_shards=1)
    sh = Shard(cfg)
    sh.set_ablated(torch.tensor([0, 1, 2]))
    res = sh.search(torch.randn(2, 8), 5, want_keys=True)
    assert bool((res.ids[:, 3:] == -1).all()) and bool(torch.isneginf(res.scores[:, 3:]).all())
    assert bool((res.keys[:, 3:] == 0).all())
    with pytest.raises(errors.InvalidArgument) as e:
        sh.search(torch.randn(2, 8), 7)
    assert e.value.field == "k"


def test_search_without_held_keys_is_invalid():
    sh = Shard(_cfg(segments=[("product", 4)], store_codebooks=False, num_shards=1))
    with pytest.raises(errors.InvalidArgument, match="searchable"):
        sh.search(torch.randn(2, 8), 3)


def test_readout_forward_backward_match_reference_and_count_usage():
    cfg = _cfg()
    sh = Shard(cfg, 1)
    lo, hi = sh.describe().info.row_start, sh.describe().info.row_end
    ids = torch.randint(lo, hi, (6, 4))
    ids[0, 1] = -1
    w = torch.rand(6, 4)
    w[1, 2] = 0.0
    values = sh.state_dict()["values"]
    local = torch.where(ids >= 0, ids - lo, -1)
    out = sh.readout(ids, w)
    torch.testing.assert_close(out, kernels.readout_weighted(values, local, w))
    g = torch.randn(6, 16)
    gw = sh.readout_backward(ids, w, g)
    ref_gw, ref_rows, ref_grads = kernels.readout_weighted_backward(values, local, w, g)
    torch.testing.assert_close(gw, ref_gw)
    rows, grads = sh._serving.row_grads[0]
    assert torch.equal(rows, ref_rows) and torch.equal(grads, ref_grads)
    u = sh.usage()
    valid = ids >= 0
    want_hits = torch.bincount(local[valid & (w > 0)], minlength=hi - lo)
    assert torch.equal(u.hits, want_hits)
    want_w = torch.zeros(hi - lo, dtype=torch.float64).index_add_(0, local[valid], w[valid].double())
    torch.testing.assert_close(u.weight_sum, want_w)


def _snapshot(sh):
    sd = sh.state_dict()
    st = sh._serving
    sd["step"] = torch.tensor(st.step)
    sd["n_row_grads"] = torch.tensor(len(st.row_grads))
    sd["n_key_grads"] = torch.tensor(len(st.key_grads))
    sd["segments"] = torch.tensor([s.num_rows for s in st.segments])
    return sd


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


BAD_CALLS = [
    ("queries", lambda s: s.search(torch.randn(2, 7), 3)),
    ("queries", lambda s: s.search(torch.randn(2, 8, dtype=torch.float64), 3)),
    ("queries", lambda s: s.search(torch.full((2, 8), float("nan")), 3)),
    ("queries", lambda s: s.search(torch.randn(0, 8), 3)),
    ("k", lambda s: s.search(torch.randn(2, 8), 0)),
    ("k", lambda s: s.search(torch.randn(2, 8), 10_000)),
    ("ids", lambda s: s.fetch(torch.tensor([51, 500]))),
    ("ids", lambda s: s.fetch(torch.tensor([3]))),          # owned by another shard
    ("ids", lambda s: s.fetch(torch.tensor([60], dtype=torch.int32))),
    ("ids", lambda s: s.readout(torch.tensor([[60, 3]]), torch.ones(1, 2))),
    ("weights", lambda s: s.readout(torch.tensor([[60, 61]]), torch.ones(1, 3))),
    ("weights", lambda s: s.readout(torch.tensor([[60, 61]]), torch.tensor([[1.0, float("inf")]]))),
    ("ids", lambda s: s.readout(torch.zeros(0, 2, dtype=torch.int64), torch.ones(0, 2))),
    ("grad_out", lambda s: s.readout_backward(torch.tensor([[60, 61]]), torch.ones(1, 2), torch.ones(1, 15))),
    ("grad_out", lambda s: s.readout_backward(torch.tensor([[60, 61]]), torch.ones(1, 2),
                                              torch.full((1, 16), float("nan")))),
    ("ids", lambda s: s.readout_backward(torch.tensor([[60, 99]]), torch.ones(1, 2), torch.ones(1, 16))),
    ("grads", lambda s: s.accumulate_key_grads(torch.tensor([60]), torch.ones(1, 9))),
    ("ids", lambda s: s.accumulate_key_grads(torch.tensor([60, 1]), torch.ones(2, 8))),
    ("ids", lambda s: s.fetch(torch.tensor([60, 3]), hits=torch.ones(2, dtype=torch.int64),
                              weight_sum=torch.ones(2, dtype=torch.float64))),
    ("hits", lambda s: s.fetch(torch.tensor([60]), hits=torch.tensor([-1]),
                               weight_sum=torch.ones(1, dtype=torch.float64))),
    ("hits", lambda s: s.fetch(torch.tensor([60]), hits=torch.ones(2, dtype=torch.int64),
                               weight_sum=torch.ones(1, dtype=torch.float64))),
    ("weight_sum", lambda s: s.fetch(torch.tensor([60]), hits=torch.ones(1, dtype=torch.int64),
                                     weight_sum=torch.ones(1))),
    ("weight_sum", lambda s: s.fetch(torch.tensor([60]), hits=torch.ones(1, dtype=torch.int64))),
    ("ids", lambda s: s.accumulate_value_grads(torch.tensor([60, 99]), torch.ones(2, 16))),
    ("grads", lambda s: s.accumulate_value_grads(torch.tensor([60]), torch.ones(1, 15))),
    ("grads", lambda s: s.accumulate_value_grads(torch.tensor([60]), torch.full((1, 16), float("inf")))),
    ("grads", lambda s: s.accumulate_value_grads(torch.tensor([60]), torch.ones(1, 16, dtype=torch.bfloat16))),
    ("values", lambda s: s.add_rows(torch.ones(2, 15), torch.ones(2, 8))),
    ("keys", lambda s: s.add_rows(torch.ones(2, 16), torch.full((2, 8), float("nan")))),
    ("ids", lambda s: s.set_frozen(torch.tensor([60, 2]), True)),
    ("ids", lambda s: s.set_ablated(torch.tensor([-1]), True)),
    ("step", lambda s: s.end_step(5)),
    ("worker", lambda s: s.end_step(0, worker=2, num_workers=2)),
    ("version", lambda s: s.readout(torch.tensor([[60]]), torch.ones(1, 1), version=-1)),
]


@pytest.mark.parametrize("field,call", BAD_CALLS)
def test_bad_input_is_invalid_argument_and_changes_nothing(field, call):
    sh = Shard(_cfg(), 2)  # rows [51, 76), last shard
    sh.readout(torch.tensor([[60, 61]]), torch.ones(1, 2))
    sh.readout_backward(torch.tensor([[60, 61]]), torch.ones(1, 2), torch.ones(1, 16))
    before = _snapshot(sh)
    with pytest.raises(errors.InvalidArgument) as e:
        call(sh)
    assert e.value.field == field
    _assert_same(before, _snapshot(sh))


def test_duplicate_request_id_is_applied_once():
    cfg = _cfg(optimizer=OptimizerConfig("sgd", lr=0.5))
    a, b = Shard(cfg, 2), Shard(cfg, 2)
    ids, w, g = torch.tensor([[60, 61], [61, 70]]), torch.rand(2, 2), torch.randn(2, 16)
    gw1 = a.readout_backward(ids, w, g, request_id="r1")
    gw2 = a.readout_backward(ids, w, g, request_id="r1")  # a retry
    a.accumulate_key_grads(torch.tensor([60]), torch.ones(1, 8), request_id="k1")
    a.accumulate_key_grads(torch.tensor([60]), torch.ones(1, 8), request_id="k1")
    assert torch.equal(gw1, gw2)
    b.readout_backward(ids, w, g, request_id="r1")
    b.accumulate_key_grads(torch.tensor([60]), torch.ones(1, 8), request_id="k1")
    assert a.end_step(0, request_id="s0") == 1
    assert a.end_step(0, request_id="s0") == 1  # retried end_step: already applied
    b.end_step(0)
    _assert_same(a.state_dict(), b.state_dict())


def test_step_barrier_two_workers_applies_once():
    cfg = _cfg(optimizer=OptimizerConfig("sgd", lr=1.0))
    sh, ref = Shard(cfg, 2), Shard(cfg, 2)
    ids, w = torch.tensor([[60, 61]]), torch.ones(1, 2)
    g0, g1 = torch.randn(1, 16), torch.randn(1, 16)
    results, errs = {}, []

    def worker(rank, g):
        try:
            sh.readout_backward(ids, w, g, request_id=f"w{rank}")
            results[rank] = sh.end_step(0, worker=rank, num_workers=2, timeout_s=10)
        except Exception as e:  # pragma: no cover
            errs.append(e)
    threads = [threading.Thread(target=worker, args=(r, g)) for r, g in ((0, g0), (1, g1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errs and results == {0: 1, 1: 1}
    ref.readout_backward(ids, w, g0 + g1)
    ref.end_step(0)
    torch.testing.assert_close(sh.state_dict()["values"], ref.state_dict()["values"])
    assert torch.equal(sh.state_dict()["opt_steps"], ref.state_dict()["opt_steps"])
    assert int(sh.state_dict()["opt_steps"].max()) == 1


def test_barrier_timeout_applies_nothing():
    sh = Shard(_cfg(), 2)
    sh.readout_backward(torch.tensor([[60]]), torch.ones(1, 1), torch.ones(1, 16))
    before = sh.state_dict()
    with pytest.raises(BarrierTimeout):
        sh.end_step(0, worker=0, num_workers=2, timeout_s=0.05)
    _assert_same(before, sh.state_dict())
    assert sh._serving.arrivals == {}  # the timed-out arrival is withdrawn
    out = []
    retry = threading.Thread(target=lambda: out.append(sh.end_step(0, worker=0, num_workers=2, timeout_s=10)))
    retry.start()
    assert sh.end_step(0, worker=1, num_workers=2, timeout_s=10) == 1
    retry.join(10)
    assert out == [1] and sh.describe().info.step == 1


def test_frozen_rows_bitwise_unchanged_by_a_step():
    sh = Shard(_cfg(), 2)
    before = sh.state_dict()
    frozen = torch.tensor([60, 61])
    sh.set_frozen(frozen)
    ids = torch.tensor([[60, 61, 62]])
    sh.readout_backward(ids, torch.ones(1, 3), torch.randn(1, 16))
    sh.accumulate_key_grads(torch.tensor([60, 62]), torch.randn(2, 8))
    sh.end_step(0)
    after = sh.state_dict()
    loc = frozen - 51
    assert torch.equal(after["values"][loc], before["values"][loc])
    assert not torch.equal(after["values"][11], before["values"][11])
    fpos = (after["flat_ids"] == 60).nonzero()[0]
    assert torch.equal(after["keys"][fpos], before["keys"][fpos])
    assert torch.equal(after["key_steps"][fpos], before["key_steps"][fpos])
    gpos = (after["flat_ids"] == 62).nonzero()[0]
    assert not torch.equal(after["keys"][gpos], before["keys"][gpos])
    sh.set_frozen(frozen, False)
    assert not bool(sh.usage().frozen.any())


def test_add_rows_only_on_last_shard_and_searchable():
    cfg = _cfg()
    last, first = Shard(cfg, 2), Shard(cfg, 0)
    key = torch.zeros(1, 8)
    key[0, 0] = 50.0
    ids = last.add_rows(torch.ones(1, 16), key)
    assert ids.tolist() == [76]
    d = last.describe()
    assert d.info.row_end == 77 and d.segments[-1].row_end == 77
    q = torch.zeros(1, 8)
    q[0, 0] = 1.0
    assert int(last.search(q, 1).ids[0, 0]) == 76
    assert torch.equal(last.fetch(ids), torch.ones(1, 16))
    with pytest.raises(errors.FailedPrecondition):
        first.add_rows(torch.ones(1, 16), key)
    # a product-only table grows a new flat segment
    p = Shard(_cfg(segments=[("product", 4)], num_shards=1))
    assert p.add_rows(torch.ones(2, 16), torch.ones(2, 8)).tolist() == [16, 17]
    assert [s.kind for s in p.describe().segments] == ["product", "flat"]


def test_bf16_values():
    sh = Shard(_cfg(value_dtype="bfloat16", num_shards=1))
    v = sh.fetch(torch.tensor([0, 50, -1]))
    assert v.dtype == torch.bfloat16 and bool((v[2] == 0).all())
    out = sh.readout(torch.tensor([[0, 50]]), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(out, 0.5 * (v[0].float() + v[1].float()).unsqueeze(0))


def test_balancing_bias_moves_against_load():
    sh = Shard(_cfg(segments=[("flat", 10)], num_shards=1, bias_step=0.1))
    sh.readout(torch.tensor([[0, 0, 0, 1]]), torch.ones(1, 4))
    sh.end_step(0)
    bias = sh.state_dict()["flat_bias"]
    assert bias[0] == pytest.approx(-0.1) and bias[1] == pytest.approx(-0.1)  # 3 and 1 hits > mean 0.4
    torch.testing.assert_close(bias[2:], torch.full((8,), 0.1))
    sh.end_step(1)  # a step without reads leaves it alone
    assert torch.equal(sh.state_dict()["flat_bias"], bias)


def test_hot_swap_with_a_request_in_flight(tmp_path, monkeypatch):
    from store_service import persistence
    cfg = _cfg(num_shards=1)
    sh = Shard(cfg)
    with persistence.staged_version(str(tmp_path), 1) as stage:
        sh.write_snapshot(stage, 1)
        persistence.finish_version(stage, 1)
    # change the serving state so old and new versions differ
    sh.readout_backward(torch.tensor([[0]]), torch.ones(1, 1), torch.ones(1, 16))
    sh.end_step(0)
    old_row = sh.fetch(torch.tensor([0]))

    entered, go = threading.Event(), threading.Event()
    real = kernels.readout_weighted

    def slow(values, ids, weights):
        entered.set()
        go.wait(10)
        return real(values, ids, weights)
    monkeypatch.setattr(kernels, "readout_weighted", slow)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", sh.readout(torch.tensor([[0]]), torch.ones(1, 1))))
    t.start()
    assert entered.wait(10)
    monkeypatch.setattr(kernels, "readout_weighted", real)

    sh.prepare_version(str(tmp_path), 1)
    sh.flip_version(1)
    new_row = sh.fetch(torch.tensor([0]))
    assert not torch.equal(new_row, old_row)
    assert sh.describe().info.version == 1
    rel = threading.Thread(target=sh.release_version, args=(0,))
    rel.start()
    rel.join(0.2)
    assert rel.is_alive()  # waits for the in-flight readout on version 0
    assert sh.held_versions()["retiring"] == []  # draining: unreachable, dropped once the readout ends
    go.set()
    t.join(10)
    rel.join(10)
    assert not rel.is_alive()
    torch.testing.assert_close(out["r"], old_row.float())  # answered wholly from the old version
    assert sh.held_versions() == {"serving": [1], "pending": [], "retiring": [], "retired": [], "leased": []}
    with pytest.raises(errors.StaleVersion):
        sh.fetch(torch.tensor([0]), version=7)
    assert torch.equal(sh.fetch(torch.tensor([0]), version=1), new_row)


def test_readout_usage_over_every_entry_is_the_masked_count_bit_for_bit(host_waits):
    """A readout's usage (hits, step hits, weight sums, changed rows) added over every entry,
    padding as nothing, is bit for bit what the valid entries picked out by masks add, and
    reads nothing back from the device (each mask made a GPU's host wait)."""
    st = Shard(_cfg(), 2)._serving            # rows [51, 76): 25 local rows
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        local = torch.randint(-1, 25, (30, 4), generator=g)
        w = torch.randn(30, 4, generator=g)
        w[0, :2] = torch.tensor([0.0, -0.0])
        valid = local >= 0
        rows, rw = local[valid], w[valid]
        hit = rows[rw > 0]
        want = {"hits": st.hits.clone().index_add_(0, hit, torch.ones_like(hit)),
                "step_hits": st.step_hits.clone().index_add_(0, hit, torch.ones_like(hit)),
                "weight_sum": st.weight_sum.clone().index_add_(0, rows, rw.double()),
                "dirty": st.dirty.clone().index_fill_(0, rows, True)}
        with host_waits() as waits:
            record_readout_usage(st, local, w)
        assert waits.count == 0, waits.ops
        for name, t in want.items():
            got = getattr(st, name)
            assert torch.equal(got.view(torch.int64) if got.dtype == torch.float64 else got,
                               t.view(torch.int64) if t.dtype == torch.float64 else t), name


def test_readout_checks_read_at_once_raise_the_first_fault_in_order():
    """The shard's checks of a readout's entries (finite, bounded weights; ids in its rows;
    grad_out) are read from the device at once; with several faults the error is still the
    one the checks in order raise, a host-side check's (grad_out's shape) included."""
    sh = Shard(_cfg(), 2)   # rows [51, 76)
    nan = torch.tensor([[float("nan"), 1.0]])
    cases = [(torch.tensor([[60, 99]]), nan, torch.ones(1, 15), "weights"),      # before grad_out's shape
             (torch.tensor([[60, 99]]), torch.full((1, 2), 1e7), torch.ones(1, 16), "weights"),   # magnitude
             (torch.tensor([[60, 99]]), torch.ones(1, 2), torch.full((1, 16), float("inf")), "ids"),
             (torch.tensor([[60, 61]]), torch.ones(1, 2), torch.ones(1, 15), "grad_out")]
    for ids, w, g, field in cases:
        with pytest.raises(errors.InvalidArgument) as e:
            sh.readout_backward(ids, w, g)
        assert e.value.field == field


def test_steps_read_back_nothing_but_their_finiteness(host_waits):
    """After the first end_step (which learns that no row is frozen), a readout reads its checks
    back once and a step's barrier reads nothing (its finiteness comes back by tolist, which runs
    no op on the CPU); gradients, optimizer and usage need no read."""
    sh = Shard(_cfg(segments=[("product", 6)], num_shards=1, store_codebooks=False, bias_step=1e-3), 0)
    ids, w = torch.tensor([[3, 4, -1], [4, 9, 3]]), torch.rand(2, 3)
    sh.readout_backward(ids, w, torch.randn(2, 16))
    sh.end_step(0)
    with host_waits() as waits:
        sh.readout(ids, w)
    assert waits.ops == {"_local_scalar_dense": 1}
    sh.readout_backward(ids, w, torch.randn(2, 16))   # (the reference kernel's unique and masks: CPU only)
    with host_waits() as waits:
        sh.end_step(1)
    assert waits.count == 0, waits.ops


def test_rows_frozen_after_a_step_are_left_alone_by_the_next():
    """Whether any row is frozen is kept on the host between steps: freezing (and thawing)
    one after a step is noticed by the next."""
    sh = Shard(_cfg(), 2)   # rows [51, 76)
    ids = torch.tensor([[60, 61]])

    def step(i):
        before = sh.state_dict()["values"]
        sh.readout_backward(ids, torch.ones(1, 2), torch.randn(1, 16))
        sh.end_step(i)
        after = sh.state_dict()["values"]
        return [not torch.equal(after[r], before[r]) for r in (9, 10)]
    assert step(0) == [True, True]
    sh.set_frozen(torch.tensor([60]))
    assert step(1) == [False, True]
    sh.set_frozen(torch.tensor([60]), False)
    assert step(2) == [True, True]


def test_one_gradient_call_with_repeated_unordered_ids_is_summed():
    """Row gradients sent by the caller (fetch mode) may repeat rows in any order: even as the
    step's only call they are summed per row (only the readout's own rows are known sorted)."""
    cfg = _cfg(optimizer=OptimizerConfig("sgd", lr=1.0))
    a, b = Shard(cfg, 2), Shard(cfg, 2)
    g = torch.randn(3, 16)
    a.accumulate_value_grads(torch.tensor([62, 60, 62]), g)
    b.accumulate_value_grads(torch.tensor([60, 62]), torch.stack([g[1], g[0] + g[2]]))
    a.end_step(0)
    b.end_step(0)
    assert torch.equal(a.state_dict()["values"], b.state_dict()["values"])
