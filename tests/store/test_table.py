"""Table over in-process shards: scatter/gather equals one shard, routing, retries, swaps."""
from dataclasses import replace
import threading

import pytest
import torch

from store_service import errors, kernels, persistence, versions
from store_service.config import OptimizerConfig, TableConfig
from store_service.interface import KnowledgeTable
from store_service.shard import Shard
from store_service.table import Table


def _cfg(num_shards=3, **kw):
    base = dict(d_k=8, d_v=16, segments=[("product", 6), ("flat", 40)], store_codebooks=True,
                num_shards=num_shards, bias_step=0.0, optimizer=OptimizerConfig("adam", lr=0.01))
    base.update(kw)
    return TableConfig(**base)


def _all_keys(table: Table):
    """Brute-force key matrix [N, d_k] and selection bias [N] of the whole table."""
    n_rows = table.info().num_rows
    keys, bias = torch.zeros(n_rows, 8), torch.zeros(n_rows)
    for sh in table.shards:
        sd = sh.state_dict()
        keys[sd["flat_ids"]] = sd["keys"]
        bias[sd["flat_ids"]] = sd["flat_bias"]
        d = sh.describe()
        for si, seg in enumerate(d.segments):
            if f"pk{si}_codebook_a" in sd:
                g = torch.arange(max(d.info.row_start, seg.row_start), min(d.info.row_end, seg.row_end))
                i, j = (g - seg.row_start) // seg.n_sub, (g - seg.row_start) % seg.n_sub
                keys[g] = torch.cat([sd[f"pk{si}_codebook_a"][i], sd[f"pk{si}_codebook_b"][j]], 1)
                bias[g] = sd[f"pk{si}_bias_a"][i] + sd[f"pk{si}_bias_b"][j]
    return keys, bias


def test_table_implements_the_protocol():
    assert isinstance(Table.create(_cfg()), KnowledgeTable)


def test_search_exact_across_segments_and_shards():
    t = Table.create(_cfg())
    q = torch.randn(9, 8)
    first = t.search(q, 6)
    t.set_ablated(first.ids[:, 0].unique())
    res = t.search(q, 6, want_keys=True)
    keys, bias = _all_keys(t)
    s = (q @ keys.T + bias).masked_fill(t.usage().ablated, float("-inf"))
    top, ids = s.topk(6, dim=1)
    assert torch.equal(res.ids, ids)
    torch.testing.assert_close(res.scores, top)
    torch.testing.assert_close(res.keys, keys[ids])
    assert not bool(torch.isin(res.ids, first.ids[:, 0].contiguous()).any())
    assert set(res.ids.flatten().tolist()) & set(range(36)) and set(res.ids.flatten().tolist()) & set(range(36, 76))
    with pytest.raises(errors.InvalidArgument, match="k"):
        t.search(q, 77)


def test_one_shard_and_three_shards_agree():
    t1, t3 = Table.create(_cfg(1)), Table.create(_cfg(3))
    assert len(t3.shards) == 3
    all_ids = torch.arange(76)
    assert torch.equal(t1.fetch(all_ids), t3.fetch(all_ids))  # init does not depend on sharding
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=gen)
    assert torch.equal(t1.search(q, 7).ids, t3.search(q, 7).ids)
    for step in range(3):
        ids = torch.randint(-1, 76, (12, 5), generator=gen)
        w = kernels.masked_softmax(torch.randn(12, 5, generator=gen), ids)
        g = torch.randn(12, 16, generator=gen)
        values = t1.fetch(all_ids)
        out1, out3 = t1.readout(ids, w), t3.readout(ids, w)
        torch.testing.assert_close(out1, out3, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out3, kernels.readout_weighted(values, ids, w), atol=1e-6, rtol=1e-6)
        gw1, gw3 = t1.readout_backward(ids, w, g), t3.readout_backward(ids, w, g)
        torch.testing.assert_close(gw1, gw3, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gw3, kernels.readout_weighted_backward(values, ids, w, g)[0],
                                   atol=1e-6, rtol=1e-6)
        flat = torch.tensor([40, 50, 75, -1])
        kg = torch.randn(4, 8, generator=gen)
        t1.accumulate_key_grads(flat, kg)
        t3.accumulate_key_grads(flat, kg)
        assert t1.end_step(step) == t3.end_step(step) == step + 1
    torch.testing.assert_close(t1.fetch(all_ids), t3.fetch(all_ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(_all_keys(t1)[0], _all_keys(t3)[0], atol=1e-6, rtol=0)
    u1, u3 = t1.usage(), t3.usage()
    assert torch.equal(u1.hits, u3.hits)
    torch.testing.assert_close(u1.weight_sum, u3.weight_sum)
    assert t3.info().step == 3


def test_routing_only_calls_owners(monkeypatch):
    t = Table.create(_cfg())
    calls = []
    for i, sh in enumerate(t.shards):
        real = sh.readout
        monkeypatch.setattr(sh, "readout", lambda ids, w, *, version=0, _r=real, _i=i: calls.append(_i) or _r(ids, w, version=version))
    t.readout(torch.tensor([[60, 70, -1]]), torch.ones(1, 3))
    assert calls == [2]


def test_bad_input_changes_nothing_on_any_shard():
    t = Table.create(_cfg())
    t.readout_backward(torch.tensor([[1, 60]]), torch.ones(1, 2), torch.ones(1, 16))

    def state():
        out = [sh.state_dict() for sh in t.shards]
        return out, [len(sh._serving.row_grads) for sh in t.shards], t.usage()
    before = state()
    bad = [
        lambda: t.readout_backward(torch.tensor([[1, 76]]), torch.ones(1, 2), torch.ones(1, 16)),
        lambda: t.readout_backward(torch.tensor([[1, 60]]), torch.ones(1, 2), torch.full((1, 16), float("inf"))),
        lambda: t.readout(torch.tensor([[1, -2]]), torch.ones(1, 2)),
        lambda: t.accumulate_key_grads(torch.tensor([40, 3]), torch.ones(2, 8)),  # 3 is a product row
        lambda: t.set_frozen(torch.tensor([1, 100])),
        lambda: t.set_ablated(torch.tensor([1, 2]), 1),
        lambda: t.fetch(torch.tensor([[1]])),
        lambda: t.add_rows(torch.ones(2, 16), torch.ones(3, 8)),
        lambda: t.search(torch.randn(2, 8), 0),
    ]
    for call in bad:
        with pytest.raises(errors.InvalidArgument):
            call()
    after = state()
    for a, b in zip(before[0], after[0]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert before[1] == after[1]
    assert all(torch.equal(getattr(before[2], f), getattr(after[2], f)) for f in ("hits", "frozen", "ablated"))


def test_one_shard_table_leaves_the_checks_to_its_shard_and_still_refuses_bad_input(host_waits):
    """A table of one shard does not check a readout before its shard does (the shard's rows
    are the table's, so its checks are the table's): one verdict read a call, not two (a host
    sync each on a GPU). Bad input is still refused and changes nothing; three shards check
    at the table first, as before."""
    t = Table.create(_cfg(num_shards=1))
    ids, w, g = torch.tensor([[1, 60], [3, -1]]), torch.rand(2, 2), torch.randn(2, 16)
    t.readout_backward(ids, w, g)
    t.end_step(0)
    # readout: the shard's checks; backward: those and the bound of its row gradients (the
    # CPU reference kernel's unique and masks are the CPU's alone)
    for call, reads in ((lambda: t.readout(ids, w), 1), (lambda: t.readout_backward(ids, w, g), 2)):
        with host_waits() as waits:
            call()
        assert waits.ops.get("_local_scalar_dense") == reads, waits.ops

    def state():
        return t.shards[0].state_dict(), len(t.shards[0]._serving.row_grads), t.usage()
    before = state()
    bad = [(lambda: t.readout(torch.tensor([[1, 76]]), torch.ones(1, 2)), "ids"),
           (lambda: t.readout(torch.tensor([[1, -2]]), torch.ones(1, 2)), "ids"),
           (lambda: t.readout(torch.tensor([[1, 2]]), torch.tensor([[1.0, float("nan")]])), "weights"),
           (lambda: t.readout(torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)), "ids"),
           (lambda: t.readout([[1, 2]], torch.ones(1, 2)), "ids"),
           # two faults: the first in the checks' order is named, as the table of many shards does
           (lambda: t.readout_backward(torch.tensor([[1, 2]]), torch.tensor([[1.0, float("nan")]]),
                                       torch.ones(1, 15)), "weights"),
           (lambda: t.readout_backward(torch.tensor([[1, 60]]), torch.ones(1, 2), torch.ones(1, 15)), "grad_out"),
           (lambda: t.readout_backward(torch.tensor([[1, 60]]), torch.ones(1, 2),
                                       torch.full((1, 16), float("inf"))), "grad_out")]
    for call, field in bad:
        with pytest.raises(errors.InvalidArgument) as e:
            call()
        assert e.value.field == field
    after = state()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1]
    assert torch.equal(before[2].hits, after[2].hits) and torch.equal(before[2].weight_sum, after[2].weight_sum)

    three = Table.create(_cfg(num_shards=3))
    three.readout_backward(ids, w, g)
    three.end_step(0)
    with host_waits() as waits:
        three.readout(ids, w)
    assert waits.ops.get("_local_scalar_dense", 0) > 1     # the table's check, then each owner's


def test_two_workers_two_threads_step_once():
    t = Table.create(_cfg(optimizer=OptimizerConfig("sgd", lr=1.0)))
    ref = Table.create(_cfg(optimizer=OptimizerConfig("sgd", lr=1.0)))
    ids, w = torch.tensor([[1, 40, 70]]), torch.ones(1, 3)
    gs = [torch.randn(1, 16), torch.randn(1, 16)]
    out, errs = {}, []

    def worker(rank):
        try:
            t.readout_backward(ids, w, gs[rank])
            out[rank] = t.end_step(0, worker=rank, num_workers=2, timeout_s=20)
        except Exception as e:  # pragma: no cover
            errs.append(e)
    ths = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    assert not errs and out == {0: 1, 1: 1}
    ref.readout_backward(ids, w, gs[0] + gs[1])
    ref.end_step(0)
    torch.testing.assert_close(t.fetch(torch.arange(76)), ref.fetch(torch.arange(76)))


def test_add_rows_freeze_ablate_usage_through_table():
    t = Table.create(_cfg())
    key = torch.zeros(2, 8)
    key[:, 1] = 40.0
    ids = t.add_rows(torch.ones(2, 16), key)
    assert ids.tolist() == [76, 77] and t.info().num_rows == 78
    assert t.info().segments[-1].row_end == 78
    q = torch.zeros(1, 8)
    q[0, 1] = 1.0
    assert set(t.search(q, 2).ids[0].tolist()) == {76, 77}
    t.set_ablated(torch.tensor([76]))
    assert 76 not in t.search(q, 2).ids[0].tolist()
    t.set_frozen(torch.tensor([0, 77]))
    t.readout(torch.tensor([[77, 0], [77, -1]]), torch.tensor([[0.5, 0.25], [1.0, 0.0]]))
    u = t.usage()
    assert u.hits.shape == (78,) and u.hits[77] == 2 and u.hits[0] == 1
    assert u.weight_sum[77] == pytest.approx(1.5)
    assert u.frozen.nonzero().flatten().tolist() == [0, 77]
    assert u.ablated.nonzero().flatten().tolist() == [76]


def test_stale_version_refreshes_and_retries(tmp_path):
    t = Table.create(_cfg(), store_root=str(tmp_path))
    v1 = t.snapshot()
    t.load_version(v1)
    other = Table(t.shards, store_root=str(tmp_path))  # another client: its map expects v1
    assert [i.version for i in other.info().shards] == [v1] * 3
    t.readout_backward(torch.tensor([[5]]), torch.ones(1, 1), torch.ones(1, 16))
    t.end_step(0)
    v2 = t.snapshot()
    t.load_version(v2)  # releases v1 on every shard
    res = other.fetch(torch.arange(76))
    assert other.info().version == v2
    assert torch.equal(res, t.fetch(torch.arange(76)))
    # A retried backward after a refresh is not applied twice.
    calls = []
    real = t.shards[0].readout_backward

    def flaky(*a, **kw):
        calls.append(kw["request_id"])
        if len(calls) == 1:
            real(*a, **kw)
            raise errors.StaleVersion(kw["version"], v2)
        return real(*a, **kw)
    t.shards[0].readout_backward = flaky
    t.readout_backward(torch.tensor([[5]]), torch.ones(1, 1), torch.ones(1, 16))
    assert len(calls) == 2 and calls[0] == calls[1]
    assert len(t.shards[0]._serving.row_grads) == 1


def test_hot_swap_through_table_with_request_in_flight(tmp_path, monkeypatch):
    """A readout in flight across the flip is answered wholly by the old version.
    (Versions must be published ones: a fresh table serves version 0 = "any".)"""
    t = Table.create(_cfg(), store_root=str(tmp_path))
    v1 = t.snapshot()
    for step in range(2):
        t.readout_backward(torch.tensor([[1, 40, 70]]), torch.ones(1, 3), torch.ones(1, 16))
        t.end_step(step)
        if step == 0:
            t.load_version(t.snapshot())  # serving a published version from here on
    trained = t.fetch(torch.arange(76))
    entered, go = threading.Event(), threading.Event()
    real = kernels.readout_weighted

    def slow(values, ids, weights):
        entered.set()
        go.wait(10)
        return real(values, ids, weights)
    monkeypatch.setattr(kernels, "readout_weighted", slow)
    ids, w = torch.tensor([[1, 40, 70]]), torch.ones(1, 3)
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("r", t.readout(ids, w)))
    reader.start()
    assert entered.wait(10)
    monkeypatch.setattr(kernels, "readout_weighted", real)
    swap = threading.Thread(target=t.load_version, args=(v1,))
    swap.start()
    swap.join(0.3)
    assert swap.is_alive()  # flipped, now draining the in-flight readout before release
    assert t.shards[0].serving_version == v1
    go.set()
    reader.join(10)
    swap.join(10)
    assert not swap.is_alive()
    new = t.fetch(torch.arange(76))
    assert not torch.equal(new, trained)
    # Shard 0 answered from the old version; if the old version was released on
    # shards 1, 2 before the reader reached them, the table retried it all on the new.
    old_sum, new_sum = (x[[1, 40, 70]].sum(0, keepdim=True) for x in (trained, new))
    assert torch.allclose(out["r"], old_sum) or torch.allclose(out["r"], new_sum)
    assert t.info().version == v1 and t.info().step == 0
    assert all(sh.held_versions()['retiring'] == [] for sh in t.shards)


def test_parallel_executor_gives_same_answers():
    a = Table.create(_cfg())
    b = Table(a.shards, parallel=True)
    q = torch.randn(4, 8)
    assert torch.equal(a.search(q, 5).ids, b.search(q, 5).ids)
    ids = torch.randint(0, 76, (6, 3))
    torch.testing.assert_close(a.readout(ids, torch.ones(6, 3)), b.readout(ids, torch.ones(6, 3)))
    b.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_table_matches_cpu_table(tmp_path):
    """Shards on the GPU (Triton kernels where they apply) give the CPU table's answers."""
    cpu, gpu = Table.create(_cfg(bias_step=0.01)), Table.create(_cfg(bias_step=0.01, device="cuda"),
                                                                  store_root=str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(33, 8, generator=gen)
    gpu.set_ablated(torch.tensor([3, 45]))
    cpu.set_ablated(torch.tensor([3, 45]))
    for step in range(3):
        a, b = cpu.search(q, 6), gpu.search(q.cuda(), 6)
        assert b.ids.is_cuda
        assert torch.equal(a.ids, b.ids.cpu())
        torch.testing.assert_close(a.scores, b.scores.cpu(), atol=1e-5, rtol=1e-5)
        ids = torch.randint(-1, 76, (20, 5), generator=gen)
        w = torch.rand(20, 5, generator=gen)
        g = torch.randn(20, 16, generator=gen)
        torch.testing.assert_close(cpu.readout(ids, w), gpu.readout(ids.cuda(), w.cuda()).cpu(),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cpu.readout_backward(ids, w, g),
                                   gpu.readout_backward(ids.cuda(), w.cuda(), g.cuda()).cpu(), atol=1e-5, rtol=1e-5)
        kg = torch.randn(2, 8, generator=gen)
        cpu.accumulate_key_grads(torch.tensor([40, 70]), kg)
        gpu.accumulate_key_grads(torch.tensor([40, 70]).cuda(), kg.cuda())
        cpu.end_step(step)
        gpu.end_step(step)
    torch.testing.assert_close(cpu.fetch(torch.arange(76)), gpu.fetch(torch.arange(76)).cpu(), atol=1e-5, rtol=1e-5)
    assert torch.equal(cpu.usage().hits, gpu.usage().hits)
    gpu.add_rows(torch.ones(2, 16, device="cuda"), torch.ones(2, 8, device="cuda"))
    gpu.set_frozen(torch.tensor([0, 77]))
    v = gpu.snapshot()
    back = Table.open(str(tmp_path), v, device="cuda")
    assert torch.equal(back.fetch(torch.arange(78)), gpu.fetch(torch.arange(78)))
    assert torch.equal(back.search(q.cuda(), 6).ids, gpu.search(q.cuda(), 6).ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_product_key_search_matches_cpu_without_ablation():
    """No ablation mask: the GPU shards take the Triton select path (rectangular: each
    shard searches its slice of codebook A) and must choose the CPU table's rows."""
    cfg = _cfg(segments=[("product", 32), ("flat", 40)], bias_step=0.01)
    cpu, gpu = Table.create(cfg), Table.create(replace(cfg, device="cuda"))
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        q = torch.randn(65, 8, generator=gen)
        a, b = cpu.search(q, 8), gpu.search(q.cuda(), 8)
        assert torch.equal(a.ids, b.ids.cpu())
        torch.testing.assert_close(a.scores, b.scores.cpu(), atol=1e-5, rtol=1e-5)
        cpu.end_step(step)
        gpu.end_step(step)


def test_search_pads_when_the_store_holds_fewer_searchable_rows_than_k():
    """Product codebooks kept by the model: the store searches its few flat rows only."""
    t = Table.create(_cfg(segments=[("product", 6), ("flat", 4)], store_codebooks=False, num_shards=2))
    res = t.search(torch.randn(3, 8), 6)
    assert bool((res.ids[:, :4] >= 36).all()) and bool((res.ids[:, 4:] == -1).all())
    assert bool(torch.isneginf(res.scores[:, 4:]).all())


def test_parallel_table_shared_by_two_worker_threads_steps_once():
    shards = Table.create(_cfg(optimizer=OptimizerConfig("sgd", lr=1.0))).shards
    t = Table(shards, parallel=True)
    out, errs = {}, []

    def worker(rank):
        try:
            t.readout_backward(torch.tensor([[1, 40, 70]]), torch.ones(1, 3), torch.ones(1, 16))
            out[rank] = t.end_step(0, worker=rank, num_workers=2, timeout_s=20)
        except Exception as e:  # pragma: no cover
            errs.append(e)
    ths = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    t.close()
    assert not errs and out == {0: 1, 1: 1}
    assert all(sh.describe().info.step == 1 for sh in shards)


def test_concurrent_traffic_with_steps_snapshot_and_swap(tmp_path):
    """Readers and writers on 3 threads while the main thread steps, snapshots and hot-swaps."""
    t = Table.create(_cfg(num_shards=2), str(tmp_path))
    stop, errs, calls = threading.Event(), [], [0]

    def client(seed):
        gen = torch.Generator().manual_seed(seed)
        while not stop.is_set():
            try:
                ids = torch.randint(-1, 76, (8, 4), generator=gen)
                w = torch.rand(8, 4, generator=gen)
                t.search(torch.randn(4, 8, generator=gen), 5)
                assert t.readout(ids, w).shape == (8, 16)
                t.readout_backward(ids, w, torch.randn(8, 16, generator=gen))
                t.fetch(ids[0])
                calls[0] += 1
            except Exception as e:  # pragma: no cover
                errs.append(e)
                return
    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    try:
        step, version = 0, None
        while step < 5:
            step = t.end_step(step)
            if step == 3 and version is None:
                version = t.snapshot()
                t.load_version(version)  # same state, now as a published version
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    assert not errs, errs[0]
    assert calls[0] > 0 and t.info().step == 5 and t.info().version == version
    snap = Table.open(str(tmp_path), version)
    assert snap.info().step == 3


from hypothesis import given, settings, strategies as st  # noqa: E402

from store_service.config import partition_rows, segment_infos  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(spec=st.lists(st.tuples(st.sampled_from(["product", "flat"]), st.integers(1, 12)), min_size=1, max_size=4),
       num_shards=st.integers(1, 6))
def test_partition_tiles_rows_and_keeps_product_rows_whole(spec, num_shards):
    segs = segment_infos(spec)
    try:
        ranges = partition_rows(segs, num_shards)
    except errors.InvalidArgument:
        return  # too few aligned boundaries for that many shards
    assert ranges[0][0] == 0 and ranges[-1][1] == segs[-1].row_end
    assert all(lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for lo, _ in ranges:
        for s in segs:
            if s.kind == "product" and s.row_start < lo < s.row_end:
                assert (lo - s.row_start) % s.n_sub == 0


# -- fetch mode: the caller's row gradients and usage ----------------------------------------

@pytest.mark.parametrize("parallel", [False, True])
def test_value_grads_and_usage_equal_pushdown_backward(parallel):
    """Row gradients the caller computed from fetched rows (repeats summed), sent in the
    background (parallel) or at once, and the usage its fetch carried, leave the table as
    pushdown's readout and backward do; a frozen row stays bitwise unchanged, a repeated request_id is applied once."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 76, (12, 5), generator=g)
    ids[0, 1] = -1
    w = torch.rand(12, 5, generator=g)
    grad_out = torch.randn(12, 16, generator=g)
    push, fetch = Table.create(_cfg()), Table.create(_cfg(), parallel=parallel)
    frozen = ids[1, :1]
    for t in (push, fetch):
        t.set_frozen(frozen)
    before = push.fetch(torch.arange(76))

    push.readout(ids, w)
    grad_w = push.readout_backward(ids, w, grad_out)
    push.end_step(0)

    valid = ids >= 0
    uniq, inverse = torch.unique(ids[valid], return_inverse=True)
    local = torch.full_like(ids, -1)
    local[valid] = inverse
    hits = torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inverse, torch.ones_like(inverse))
    wsum = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, w[valid].double())
    values = fetch.fetch(uniq, hits=hits, weight_sum=wsum)
    assert torch.equal(values, fetch.fetch(uniq))   # the usage changes no value
    gw, rows, row_grads = kernels.readout_weighted_backward(values, local, w, grad_out)
    torch.testing.assert_close(gw, grad_w)
    # Sent in two halves with repeats, and the first half twice under one request_id.
    half = rows.numel() // 2
    fetch.accumulate_value_grads(uniq[rows[:half]], row_grads[:half], request_id="a")
    fetch.accumulate_value_grads(uniq[rows[:half]], row_grads[:half], request_id="a")
    fetch.accumulate_value_grads(torch.cat([uniq[rows[half:]], uniq[rows[half:]]]),
                                 torch.cat([row_grads[half:] * 0.25, row_grads[half:] * 0.75]), request_id="b")
    fetch.end_step(0)

    all_ids = torch.arange(76)
    torch.testing.assert_close(fetch.fetch(all_ids), push.fetch(all_ids), rtol=1e-5, atol=1e-7)
    assert torch.equal(fetch.fetch(frozen), before[frozen])
    assert not torch.equal(push.fetch(all_ids), before)
    up, uf = push.usage(), fetch.usage()
    assert torch.equal(uf.hits, up.hits)
    torch.testing.assert_close(uf.weight_sum, up.weight_sum)


def test_background_send_error_surfaces_at_end_step():
    """A row-gradient send that fails in the background is raised by the next end_step
    (the barrier never applies a step that lost gradients), and only once."""
    class Failing(Shard):
        def accumulate_value_grads(self, *a, **kw):
            raise errors.ShardUnavailable(self.shard_id, "test", "down")

    cfg = _cfg(num_shards=2)
    shards = [Shard(cfg, 0, cfg.shard_ranges()[0]), Failing(cfg, 1, cfg.shard_ranges()[1])]
    t = Table(shards, parallel=True)
    t.accumulate_value_grads(torch.tensor([0, 75]), torch.ones(2, 16))   # returns at once
    with pytest.raises(errors.ShardUnavailable):
        t.end_step(0)
    assert t.info().step == 0
    t.flush()   # nothing pending any more


def test_value_grads_bad_input_is_refused_at_the_call():
    t = Table.create(_cfg(), parallel=True)
    with pytest.raises(errors.InvalidArgument, match="grads"):
        t.accumulate_value_grads(torch.tensor([1]), torch.ones(1, 15))
    with pytest.raises(errors.InvalidArgument, match="ids"):
        t.accumulate_value_grads(torch.tensor([76]), torch.ones(1, 16))
    with pytest.raises(errors.InvalidArgument, match="hits"):
        t.fetch(torch.tensor([1]), hits=torch.tensor([-1]), weight_sum=torch.ones(1, dtype=torch.float64))
    t.end_step(0)
    assert int(t.usage().hits.sum()) == 0


def test_search_after_rows_were_appended_to_the_last_shard():
    """Shard 0 last described the table before the flat rows existed (they go to the last
    shard): it answers from its own rows, padded, instead of refusing k or its lack of keys."""
    t = Table.create(_cfg(segments=[("product", 6)], store_codebooks=False, num_shards=2))
    keys = torch.randn(5, 8) * 4
    ids = t.add_rows(torch.randn(5, 16), keys)
    res = t.search(keys, 40)                       # more than the 36 rows shard 0 knows of
    assert torch.equal(res.ids[:, :5].sort(1).values, ids.expand(5, 5))
    assert bool((res.ids[:, 5:] == -1).all())
    with pytest.raises(errors.InvalidArgument, match="k=42 exceeds"):
        t.search(keys, 42)


# -- store-side product search (TableConfig.store_codebooks) --------------------------------

def _product_table(tmp_path, num_shards: int, **kw) -> Table:
    return Table.create(_cfg(num_shards, segments=[("product", 12)], store_codebooks=True, **kw), str(tmp_path))


def _model_side(table: Table, q: torch.Tensor, k: int, ca, cb, ba, bb, ablated=None):
    """What the model searches on the worker: kernels.product_key_search over whole codebooks."""
    return kernels.product_key_search(q[:, :4].contiguous(), q[:, 4:].contiguous(), ca, cb, k, ba, bb, ablated)


def test_store_side_product_search_equals_the_model_side_kernel_on_one_shard(tmp_path):
    """One shard holds whole codebooks and sub-key biases (balanced here for some steps):
    its search is the model-side kernel's, bitwise, with and without ablated rows."""
    t = _product_table(tmp_path, 1, bias_step=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        t.readout(torch.randint(0, 144, (20, 4), generator=gen), torch.rand(20, 4, generator=gen))
        t.end_step(step)
    sd = t.shards[0].state_dict()
    ca, cb, ba, bb = (sd[f"pk0_{n}"] for n in ("codebook_a", "codebook_b", "bias_a", "bias_b"))
    assert bool(ba.any()) and bool(bb.any())
    q = torch.randn(33, 8, generator=gen)
    res = t.search(q, 10, want_keys=True)
    s, ids = _model_side(t, q, 10, ca, cb, ba, bb)
    assert torch.equal(res.ids, ids) and torch.equal(res.scores, s)
    assert torch.equal(res.keys, torch.cat([ca[ids // 12], cb[ids % 12]], -1))
    t.set_ablated(ids[:, :3].unique())
    mask = t.usage().ablated
    s, ids = _model_side(t, q, 10, ca, cb, ba, bb, mask)
    res = t.search(q, 10)
    assert torch.equal(res.ids, ids) and torch.equal(res.scores, s)


def test_store_side_product_search_over_shards_equals_the_model_side_kernel(tmp_path):
    """Three shards, each searching its slice of the first codebook against the whole second
    one, merged by the table: the model-side kernel's rows over the same codebooks and biases
    (set here through a rewritten version; each shard balances its own second-codebook biases,
    so only equal ones make the comparison one search)."""
    t = _product_table(tmp_path, 3, bias_step=0.0)
    v = t.snapshot()
    gen = torch.Generator().manual_seed(1)
    ba, bb = torch.randn(12, generator=gen) * 0.3, torch.randn(12, generator=gen) * 0.3

    def set_biases(d):
        return persistence.ShardData(d.attrs, dict(d.arrays, pk0_bias_a=ba.numpy(), pk0_bias_b=bb.numpy()))
    versions.rewrite_version(str(tmp_path), v, set_biases)
    t = Table.open(str(tmp_path), v)
    sd = t.shards[0].state_dict()
    ca, cb = sd["pk0_codebook_a"], sd["pk0_codebook_b"]
    q = torch.randn(40, 8, generator=gen)
    res = t.search(q, 9)
    s, ids = _model_side(t, q, 9, ca, cb, ba, bb)
    assert torch.equal(res.ids, ids)
    torch.testing.assert_close(res.scores, s, rtol=0, atol=1e-6)
