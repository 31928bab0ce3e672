"""Issue 18's single calls (cases 1-4 and 6), each sent exactly as a hostile or careless
client sent it, to a real served shard: each gets its documented status code and changes
nothing. The scenarios (5, 7-9) are in test_auth.py and test_recovery.py."""
from __future__ import annotations

import math
import os
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import knowledge_store_pb2 as pb
from store_service import errors, guard, persistence, wire
from store_service.config import OptimizerConfig
from store_service.limits import Limits

IA, RE, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION
T = wire.to_proto


def _end_step(h, **kw):
    return pb.EndStepRequest(step=h.shard.describe().info.step, **kw)


# -- (1) the step barrier ---------------------------------------------------------------

@pytest.mark.parametrize("timeout_s", [math.inf, 1e10, 9e9, 0.0, math.nan, -1.0, 3600.5])
def test_end_step_timeout_out_of_range_is_refused_and_changes_nothing(hostile, timeout_s):
    h = hostile
    h.expect(h.store.EndStep, _end_step(h, worker=0, num_workers=2, timeout_s=timeout_s), IA, role="train",
             contains="timeout_s")
    # no stale arrival is left behind: a legitimate one-worker step goes through at once
    r = h.store.EndStep(_end_step(h, worker=0, num_workers=1, timeout_s=5), timeout=10, metadata=h.md("train"))
    assert r.step == 1


def test_barrier_membership_is_that_of_the_waiting_workers_and_leaves_with_them(hostile):
    h = hostile
    # a worker that claims 2 workers and then goes away (its deadline) is withdrawn
    with pytest.raises(grpc.RpcError) as info:
        h.store.EndStep(_end_step(h, worker=0, num_workers=2, timeout_s=30), timeout=0.5, metadata=h.md("train"))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 3
    while h.shard._serving.arrivals and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h.shard._serving.arrivals == {}
    assert h.store.EndStep(_end_step(h, num_workers=1, timeout_s=5), timeout=10, metadata=h.md("train")).step == 1
    # while a worker waits, the count it joined with is the step's: another count is refused
    waiter = h.store.EndStep.future(_end_step(h, worker=0, num_workers=2, timeout_s=20), timeout=30,
                                    metadata=h.md("train"))
    time.sleep(0.3)
    h.expect(h.store.EndStep, _end_step(h, worker=0, num_workers=1, timeout_s=5), IA, role="train",
             contains="num_workers")
    # the second member arrives: the step applies for both
    assert h.store.EndStep(_end_step(h, worker=1, num_workers=2, timeout_s=5), timeout=10,
                           metadata=h.md("train")).step == 2
    assert waiter.result().step == 2


def test_barrier_waiters_never_take_the_threads_of_reads_and_health(hostile):
    h = hostile
    limit = Limits().max_barrier_waiters
    calls = [h.store.EndStep.future(_end_step(h, worker=i, num_workers=100, timeout_s=20), timeout=30,
                                    metadata=h.md("train")) for i in range(limit + 4)]
    time.sleep(0.5)
    health = health_pb2_grpc.HealthStub(h.channel)
    q = T(torch.randn(4, h.D_K))
    for _ in range(3):
        t0 = time.monotonic()
        h.store.Search(pb.SearchRequest(queries=q, k=4), timeout=2, metadata=h.md("read"))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - t0 < 1.0
    refused = [c for c in calls if c.done() and c.exception() is not None]
    assert len(refused) == 4
    assert all(c.exception().code() == RE and "max_barrier_waiters" in c.exception().details() for c in refused)
    for c in calls:
        c.cancel()
    deadline = time.monotonic() + 3
    while h.shard._serving.arrivals and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h.shard._serving.arrivals == {} and h.shard.describe().info.step == 0


# -- (2) nothing stored ever becomes non-finite ----------------------------------------

def test_huge_value_gradients_are_refused_at_the_call(hostile):
    h = hostile
    err = h.expect(h.store.AccumulateValueGrads,
                   pb.AccumulateValueGradsRequest(ids=T(torch.tensor([10, 10])), grads=T(torch.full((2, h.D_V), 3e38))),
                   IA, role="train", contains="max_grad_abs")
    assert dict(err.trailing_metadata())["ks-field"] == "grads"
    h.store.EndStep(_end_step(h, num_workers=1, timeout_s=5), timeout=10, metadata=h.md("train"))
    assert bool(torch.isfinite(h.shard.state_dict()["values"]).all())
    assert 'kstore_nonfinite_refused_total{method="AccumulateValueGrads"} 1.0' in h.metrics_text()


def test_huge_readout_weights_and_grad_out_are_refused(hostile):
    h = hostile
    req = pb.ReadoutBackwardRequest(ids=T(torch.tensor([[11]])), weights=T(torch.tensor([[1e20]])),
                                    grad_out=T(torch.full((1, h.D_V), 1e20)))
    h.expect(h.store.ReadoutBackward, req, IA, role="train", contains="max_weight_abs")
    # each within its own bound, their product over the bound of a gradient: refused too
    req = pb.ReadoutBackwardRequest(ids=T(torch.tensor([[11]])), weights=T(torch.tensor([[1e6]])),
                                    grad_out=T(torch.full((1, h.D_V), 1e8)))
    h.expect(h.store.ReadoutBackward, req, IA, role="train", contains="max_grad_abs")


def test_huge_key_gradients_are_refused_and_search_is_unaffected(hostile):
    h = hostile
    h.expect(h.store.AccumulateKeyGrads,
             pb.AccumulateKeyGradsRequest(ids=T(torch.tensor([300, 300])), grads=T(torch.full((2, h.D_K), 3e38))),
             IA, role="train", contains="max_grad_abs")
    h.store.EndStep(_end_step(h, num_workers=1, timeout_s=5), timeout=10, metadata=h.md("train"))
    assert bool(torch.isfinite(h.shard.state_dict()["keys"]).all())


def test_a_step_whose_result_is_not_finite_is_refused_whole(hostile):
    """Gradients within their bound, a learning rate that makes the step overflow: end_step
    refuses the step (FAILED_PRECONDITION), drops its gradients, changes nothing."""
    h = hostile.make("sgd", optimizer=OptimizerConfig("sgd", lr=1e32))
    before = h.observe()
    h.store.AccumulateValueGrads(pb.AccumulateValueGradsRequest(ids=T(torch.tensor([10, 12])),
                                                                grads=T(torch.full((2, h.D_V), 1e8))),
                                 timeout=10, metadata=h.md("train"))
    with pytest.raises(grpc.RpcError) as info:
        h.store.EndStep(_end_step(h, num_workers=1, timeout_s=5), timeout=10, metadata=h.md("train"))
    assert info.value.code() == FP and "non-finite" in info.value.details()
    before["pending"] = 0
    h.assert_unchanged(before)
    assert 'kstore_nonfinite_refused_total{method="EndStep"} 1.0' in h.metrics_text()


def test_a_refused_step_tells_its_own_waiters_and_not_a_later_round():
    from store_service.config import TableConfig
    from store_service.shard import Shard
    shard = Shard(TableConfig(d_k=8, d_v=16, segments=[("flat", 10)], optimizer=OptimizerConfig("sgd", lr=1e32)))
    shard.accumulate_value_grads(torch.tensor([1]), torch.full((1, 16), 1e8))
    results = {}

    def worker(w):
        try:
            results[w] = shard.end_step(0, worker=w, num_workers=2, timeout_s=10)
        except errors.StepRefused:
            results[w] = "refused"

    for want in ("refused", 1):   # the overflowing step, then a new round of step 0 without gradients
        t = threading.Thread(target=worker, args=(0,))
        t.start()
        time.sleep(0.3)
        worker(1)
        t.join()
        assert results == {0: want, 1: want}


def test_snapshot_checks_finiteness_before_publishing(hostile):
    h = hostile
    h.shard._serving.values[3, 0] = float("nan")   # no call can do this; a bug or a bit flip could
    stage = persistence.new_stage(h.root, 9)
    with pytest.raises(errors.FailedPrecondition, match="row 3 has non-finite values"):
        h.shard.write_snapshot(stage, 9)
    assert os.listdir(stage) == ["zarr.json"]   # nothing written


@pytest.mark.parametrize("block_elems", [1, 16, 1 << 26])
def test_finiteness_check_in_blocks_names_the_first_bad_row(hostile, block_elems):
    # checked block by block so that a 16M-row shard never needs a whole fp32 copy; the row named
    # must be the same whatever the block size, including a bad row in the last partial block
    from store_service.step import check_finite_rows
    st = hostile.shard._serving
    last = st.values.shape[0] - 1
    st.values[last, -1] = float("inf")
    with pytest.raises(errors.FailedPrecondition, match=f"row {st.row_start + last} has non-finite values"):
        check_finite_rows(st, block_elems=block_elems)
    st.values[last, -1] = 0.0
    check_finite_rows(st, block_elems=block_elems)   # finite again: passes


# -- (3) bounded work per request --------------------------------------------------------

@pytest.mark.parametrize("queries", [64, 256])
def test_search_with_huge_k_is_refused_naming_the_limit(hostile, queries):
    h = hostile
    err = h.expect(h.store.Search, pb.SearchRequest(k=65536, queries=T(torch.randn(queries, h.D_K))), RE,
                   role="read", contains="max_k")
    assert dict(err.trailing_metadata())["ks-limit"] == "max_k"


@pytest.mark.parametrize("rows", [1 << 20, 1 << 23])
def test_readout_whose_slot_mask_claims_huge_rows_is_refused(hostile, rows):
    h = hostile
    bits = bytearray((rows + 7) // 8)
    bits[0] = 1
    req = pb.ReadoutRequest(ids=T(torch.tensor([11])), weights=T(torch.tensor([1.0])),
                            slots=pb.SlotMask(rows=rows, cols=1, bits=bytes(bits)))
    h.expect(h.store.Readout, req, RE, role="read", contains="max_readout_rows")


def test_pending_gradients_are_bounded_per_step(hostile):
    h = hostile.make("small", limits=Limits(max_pending_grad_bytes=20 << 20))
    ids = torch.arange(256, 356).repeat(656)[:65536]                      # 65536 rows x 32 fp32 = 8 MiB a call
    req = pb.AccumulateValueGradsRequest(ids=T(ids), grads=T(torch.full((65536, h.D_V), 1e-3)))
    for _ in range(2):
        h.store.AccumulateValueGrads(req, timeout=30, metadata=h.md("train"))
    h.expect(h.store.AccumulateValueGrads, req, RE, role="train", contains="max_pending_grad_bytes")
    h.store.EndStep(_end_step(h, num_workers=1, timeout_s=5), timeout=30, metadata=h.md("train"))
    h.store.AccumulateValueGrads(req, timeout=30, metadata=h.md("train"))   # the next step has room again


def test_answers_over_the_reply_bound_are_refused(hostile):
    h = hostile.make("reply", limits=Limits(max_reply_bytes=1 << 16))
    h.expect(h.store.Fetch, pb.FetchRequest(ids=T(torch.arange(356).repeat(2))), RE, role="read",
             contains="max_reply_bytes")
    h.store.Fetch(pb.FetchRequest(ids=T(torch.arange(100))), timeout=10, metadata=h.md("read"))


def test_default_limits_admit_the_benchmarks_sizes():
    """Fetches of 100k rows x 1024 bf16 (and as float32), readouts of 4k tokens x k 32 over
    d_v 1024, searches of 1024 queries x k 32 over d_k 128 pass the default bounds."""
    lim = Limits()
    ids = pb.Tensor(dtype="int64", shape=[100_000])
    guard.fetch(pb.FetchRequest(ids=ids, out_dtype="bfloat16"), lim, 1024, 2)
    guard.fetch(pb.FetchRequest(ids=ids), lim, 1024, 4)
    guard.readout(pb.ReadoutRequest(ids=pb.Tensor(dtype="int64", shape=[4096, 32])), lim, 1024, backward=False)
    guard.search(pb.SearchRequest(k=32, queries=pb.Tensor(dtype="float32", shape=[1024, 128])), lim, 128)
    assert lim.max_fetch_rows >= 100_000 and lim.max_pending_grad_bytes >= 100_000 * 1024 * 4 * 4


# -- (4) usage counters ---------------------------------------------------------------

def test_usage_counters_out_of_range_are_refused(hostile):
    h = hostile
    req = pb.FetchRequest(ids=T(torch.tensor([20])), hits=T(torch.tensor([2 ** 62])),
                          weight_sum=T(torch.tensor([-1e300], dtype=torch.float64)))
    for _ in range(2):
        h.expect(h.store.Fetch, req, IA, role="train", contains="max_usage_hits")
    req.hits.CopyFrom(T(torch.tensor([1])))
    h.expect(h.store.Fetch, req, IA, role="train", contains="max_usage_weight_abs")
    # usage is training: the read role may fetch, not count
    h.expect(h.store.Fetch, req, grpc.StatusCode.PERMISSION_DENIED, role="read")
    u = h.shard.usage()
    assert int(u.hits.min()) >= 0 and float(u.weight_sum.abs().max()) == 0.0


# -- (6) admin paths, corrupt data, short errors ----------------------------------------

BAD_PATHS = ["float32", ".", "../../etc/passwd", "x" * 10_000, "/proc/self", "/tmp/elsewhere", "a\x00b",
             "staging/../../outside", "versions/v00000001", "staging"]


@pytest.mark.parametrize("path", BAD_PATHS, ids=range(len(BAD_PATHS)))
def test_write_snapshot_paths_outside_staging_are_refused(hostile, path, tmp_path, monkeypatch):
    h = hostile
    monkeypatch.chdir(tmp_path)
    cwd_before, root_before = sorted(os.listdir(tmp_path)), sorted(os.walk(h.root))
    h.expect(h.admin.WriteSnapshot, pb.WriteSnapshotRequest(version_dir=path, version=7), IA, contains="version_dir")
    assert sorted(os.listdir(tmp_path)) == cwd_before and sorted(os.walk(h.root)) == root_before


@pytest.mark.parametrize("path", ["../../etc", "x" * 10_000, "/proc", "a\x00b", "/tmp"], ids=range(5))
def test_prepare_version_paths_outside_the_root_are_refused(hostile, path):
    h = hostile
    h.expect(h.admin.PrepareVersion, pb.PrepareVersionRequest(store_root=path, version=h.version), IA,
             contains="store_root")


def _second_version(h) -> str:
    from store_service.table import Table
    t = Table.open(h.root, h.version)
    v = t.snapshot(full=True)   # whole arrays (a delta of nothing changed has no value chunks)
    t.close()
    return persistence.version_path(h.root, v), v


def test_corrupt_zarr_json_is_data_loss_naming_the_file(hostile):
    h = hostile
    path, v = _second_version(h)
    with open(os.path.join(path, "shard_0000", "zarr.json"), "w") as f:
        f.write("{not json")
    err = h.expect(h.admin.PrepareVersion, pb.PrepareVersionRequest(store_root="", version=v),
                   grpc.StatusCode.DATA_LOSS, contains="shard_0000/zarr.json")
    assert "{not json" not in err.details()


def test_truncated_chunk_is_data_loss_naming_the_array(hostile):
    h = hostile
    path, v = _second_version(h)
    chunk = os.path.join(path, "shard_0000", "values", "c", "0", "0")
    with open(chunk, "r+b") as f:
        f.truncate(10)
    h.expect(h.admin.PrepareVersion, pb.PrepareVersionRequest(store_root="", version=v),
             grpc.StatusCode.DATA_LOSS, contains="shard_0000/values")


def test_snapshot_over_grpc_still_works_through_relative_staging(hostile):
    """The client sends the staging directory relative to the store root."""
    from store_service.client import connect
    h = hostile
    t = connect([h.server.address], token=h.tokens.admin, store_root=h.root)
    try:
        v = t.snapshot()
        t.load_version(v)
        assert t.info().shards[0].version == v
    finally:
        t.close()
        for s in t.shards:
            s.close()
