"""A swap to a number a serving state already carries never mixes versions (store_service/labels.py).

Found by benchmarks/ray_placement.py (STORE_NOTES "Ray placement on the GPU"): Table.snapshot
published v2 but left the serving states labelled v1, so a rollback to v1 had two states under
one number while the shards flipped one after the other, and a request pinned to v1 was answered
by the published v1 on a flipped shard and by the trained state on the other. Now the snapshot
relabels the serving states with the number it published, a swap first moves any state held
under its target number to a fresh unpublished label, a shard refuses to load a number it holds,
and a lease reaches only the state it pinned. Each test steps through a swap by hand (shard 0
flipped, shard 1 not yet) and asks for an answer wholly from one version, in process and
through real gRPC servers.
"""
import threading

import grpc
import pytest
import torch

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import errors, labels, wire
from store_service.client import connect
from store_service.config import TableConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table

TOKEN = "same-number"
IDS = torch.arange(64)


@pytest.fixture
def trained(tmp_path):
    """(store root, v1, rows of v1, rows after one training step): two shards, v1 published."""
    root = str(tmp_path)
    t = Table.create(TableConfig(d_k=8, d_v=16, segments=[("flat", 64)], num_shards=2), root)
    v1 = t.snapshot()
    t.accumulate_value_grads(IDS, torch.ones(64, 16))
    t.end_step(t.info().step)
    after = t.fetch(IDS)
    t.close()
    before = Table.open(root, v1).fetch(IDS)
    assert not torch.equal(before, after)
    return root, v1, before, after


def _train(t: Table) -> None:
    t.accumulate_value_grads(IDS, torch.ones(64, 16))
    t.end_step(t.info().step)


def _one_of(got: torch.Tensor, *versions: torch.Tensor) -> bool:
    return any(torch.equal(got, v) for v in versions)


def test_rollback_to_the_loaded_number_never_mixes(trained):
    root, v1, before, after = trained
    t = Table.open(root, v1)
    try:
        _train(t)
        v2 = t.snapshot()                          # v2: the trained rows; the states are labelled v2 now
        assert [i.version for i in t.info().shards] == [v2, v2]
        s0 = t.shards[0]
        s0.prepare_version(root, v1)               # the rollback, half way: shard 0 flipped
        s0.flip_version(v1)
        assert torch.equal(t.fetch(IDS), after)    # pinned to v2: shard 0's retiring state answers
        t.shards[1].prepare_version(root, v1)
        t.shards[1].flip_version(v1)
        assert torch.equal(t.fetch(IDS), after)    # both retiring states, until released
        for s in t.shards:
            s.release_version(v2)
        assert torch.equal(t.fetch(IDS), before)   # StaleVersion, refreshed onto v1
    finally:
        t.close()


@pytest.mark.parametrize("snapshot_first", [False, True], ids=["loaded-number", "published-number"])
def test_a_swap_to_the_number_of_a_state_trained_since_never_mixes(trained, snapshot_first):
    """The state trained after it was loaded (or published) as v: a swap to v (a recovery, a
    rollback) first moves it to an unpublished label; a shard refuses to load v before that."""
    root, v1, before, after = trained
    t = Table.open(root, v1)
    try:
        v = t.snapshot() if snapshot_first else v1
        published = t.fetch(IDS)
        _train(t)
        trained_rows = t.fetch(IDS)
        assert not torch.equal(trained_rows, published) and t.info().shards[0].version == v
        with pytest.raises(errors.FailedPrecondition, match="relabel it first"):
            t.shards[0].prepare_version(root, v)
        disowned = labels.unpublished_label()      # Table.load_version's steps, by hand
        assert [s.relabel_version(v, disowned) for s in t.shards] == [1, 1]
        with pytest.raises(errors.StaleVersion):
            t.shards[1].fetch(IDS[32:], version=v)
        t.refresh()                                # the table follows its states to their new label
        s0 = t.shards[0]
        s0.prepare_version(root, v)
        s0.flip_version(v)
        assert torch.equal(t.fetch(IDS), trained_rows)   # wholly the disowned state, on both shards
        t.shards[1].prepare_version(root, v)
        t.shards[1].flip_version(v)
        for s in t.shards:
            s.release_version(disowned)
        assert torch.equal(t.fetch(IDS), published)
        assert all(s.held_versions()["retiring"] == [] for s in t.shards)
        _train(t)
        t.load_version(v)                          # the whole swap, from the table
        assert torch.equal(t.fetch(IDS), published)
        assert [s.held_versions()["serving"] for s in t.shards] == [[v], [v]]
        assert all(s.held_versions()["retiring"] == [] for s in t.shards)
    finally:
        t.close()


def test_a_recovery_to_the_number_the_trained_shards_carry(trained):
    """Shard 1 restarts on v1 (as a Ray restart loads the cluster's registered version) while
    shard 0 carries v2 and trained past it: recovering to v2 disowns shard 0's state and loads
    v2 on both, though the shards disagree until the flip."""
    root, v1, before, after = trained
    t = Table.open(root, v1)
    try:
        _train(t)
        v2 = t.snapshot()
        published = t.fetch(IDS)
        _train(t)
        t.rebind([t.shards[0], Shard.load(root, v1, 1)], refresh=False)   # the restart
        with pytest.raises(errors.ShardsDisagree):
            t.snapshot()
        assert t.recover(v2) == (v2, 1)
        assert torch.equal(t.fetch(IDS), published)
        assert t.shards[0].held_versions()["retiring"] == []
    finally:
        t.close()


def test_a_snapshot_relabels_only_the_state_that_wrote_the_number(trained):
    root, v1, _, _ = trained
    shard = Shard.load(root, v1, 0)
    with pytest.raises(errors.FailedPrecondition, match="last wrote"):
        shard.relabel_version(v1, v1 + 5)          # it never wrote v1 + 5
    with pytest.raises(errors.FailedPrecondition, match="already holds"):
        shard.relabel_version(v1 + 7, v1)
    with pytest.raises(errors.InvalidArgument):
        shard.relabel_version(v1, 0)
    assert shard.relabel_version(v1 + 7, labels.unpublished_label()) == 0
    assert shard.serving_version == v1


def test_a_lease_reaches_only_the_state_it_pinned(trained):
    """A read in pieces leased the trained state labelled v1; the state is disowned and v1
    loaded beside it: the next piece gets StaleVersion, never the loaded v1's rows."""
    root, v1, before, after = trained
    t = Table.open(root, v1)
    try:
        _train(t)
        s0 = t.shards[0]
        lease, pinned = s0.lease_version(v1, holder="reader")
        first = s0.fetch(IDS[:16], version=v1, lease=lease)
        s0.relabel_version(v1, labels.unpublished_label())
        s0.prepare_version(root, v1)
        with pytest.raises(errors.StaleVersion):
            s0.fetch(IDS[16:32], version=v1, lease=lease)
        assert torch.equal(s0.fetch(IDS[16:32], version=v1), before[16:32])   # v1 without it: the loaded one
        assert torch.equal(s0.fetch(IDS[:16], version=0, lease=lease), first)   # the pinned state, any label
    finally:
        t.close()


def test_rollback_through_grpc_never_mixes(trained):
    """The same rollback against two shard servers: the snapshot relabels them over gRPC, a
    reader whose map predates the snapshot gets one version wholly while the shards flip one by
    one, and a lease on the relabelled state answers stale-version, never the new state's rows."""
    root, v1, before, after = trained
    servers = [serve_shard(Shard.load(root, v1, i), admin_token=TOKEN) for i in range(2)]
    addresses = [s.address for s in servers]
    admin = connect(addresses, admin_token=TOKEN, store_root=root, timeout_s=20)
    reader = connect(addresses, token=TOKEN, timeout_s=20)
    try:
        assert torch.equal(reader.fetch(IDS), before)        # the reader's map: v1
        _train(admin)
        v2 = admin.snapshot()
        assert [d.info.version for d in (s.describe() for s in admin.shards)] == [v2, v2]
        s0, s1 = admin.shards
        s0.prepare_version(root, v1)
        s0.flip_version(v1)                                   # half way
        assert torch.equal(admin.fetch(IDS), after)          # pinned to v2
        flip = threading.Timer(0.5, lambda: (s1.prepare_version(root, v1), s1.flip_version(v1)))
        flip.start()
        try:
            got = reader.fetch(IDS)                           # pinned to v1: shard 1 answers StaleVersion
        finally:
            flip.join()
        assert _one_of(got, before, after), "a fetch mixed two versions"
        assert torch.equal(reader.fetch(IDS), before)
        for s in admin.shards:
            s.release_version(v2)
        admin.refresh()
        _train(admin)                                          # the served v1 trains on
        stub = pb_grpc.KnowledgeStoreStub(grpc.insecure_channel(addresses[0]))
        md = ((wire.MD_AUTHORIZATION, wire.bearer(TOKEN)),)
        lease = stub.LeaseVersion(pb.LeaseRequest(version=v1, ttl_s=20), metadata=md)
        admin.load_version(v1)                                # disowns it first, then loads v1
        req = wire.fetch_request_to_proto(IDS[:8], None, None, "", v1)
        req.lease = lease.lease
        with pytest.raises(grpc.RpcError) as err:
            stub.Fetch(req, metadata=md)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dict(err.value.trailing_metadata()).get(wire.MD_ERROR) == "stale-version"
        assert torch.equal(reader.fetch(IDS), before) and torch.equal(admin.fetch(IDS), before)
        assert [s.describe().info.version for s in admin.shards] == [v1, v1]
    finally:
        for table in (reader, admin):
            for s in table.shards:
                s.close()
        for s in servers:
            s.stop(grace=None)
