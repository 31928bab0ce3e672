"""The cluster on a real embedded Ray: registry, shard actors serving real gRPC
from real Zarr versions, restart after a kill, scaling, hot swap under load."""
from __future__ import annotations

import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.config import ClusterConfig  # noqa: E402
from cluster.launch import StoreCluster  # noqa: E402
from store_service import persistence  # noqa: E402
from store_service.config import OptimizerConfig, TableConfig  # noqa: E402

TABLE = TableConfig(d_k=16, d_v=32, segments=[("product", 8), ("flat", 40)], store_codebooks=True,
                    optimizer=OptimizerConfig(kind="sgd", lr=0.5), seed=3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    c = StoreCluster.start(ClusterConfig(store_root=str(root), num_shards=2), TABLE)
    yield c
    c.stop()
    ray.shutdown()


def probe(table, seed: int = 0):
    """A fixed batch of search + readout + fetch answers."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 16, generator=g)
    ids = torch.randint(0, table.info().num_rows, (6, 5), generator=g)
    w = torch.softmax(torch.randn(6, 5, generator=g), -1)
    s = table.search(q, 5)
    return s.ids, s.scores, table.readout(ids, w), table.fetch(ids[0])


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_registry_holds_complete_map(cluster):
    m = cluster.shard_map()
    assert m.complete() and m.num_shards == 2
    ranges = sorted((e.row_start, e.row_end) for e in m.entries.values())
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == 64 + 40
    assert len({e.address for e in m.entries.values()}) == 2
    status = cluster.status()
    assert all(s["healthy"] for s in status["shards"])


def test_restart_after_kill_reloads_and_reregisters(cluster):
    table = cluster.table()
    try:
        before = probe(table)
        old = cluster.shard_map()
        dead_pid = cluster.kill_shard(1)
        after = probe(table)  # the client follows the registry to the restarted shard
        new = cluster.shard_map()
        assert new.entries[1].pid != dead_pid and new.entries[1].address != old.entries[1].address
        assert new.revision > old.revision
        assert_same(before, after)
    finally:
        table.close()


def test_scale_2_to_4_to_1_gives_identical_answers(cluster):
    table = cluster.table()
    try:
        before = probe(table)
        for n in (4, 1):
            cluster.scale(n, drain_s=0.5)
            assert cluster.shard_map().num_shards == n
            assert_same(before, probe(table))
            assert len(table.shards) == n
    finally:
        table.close()
    cluster.scale(2, drain_s=0.5)


def test_hot_swap_under_load_zero_failed_calls(cluster):
    table = cluster.table()
    serving = cluster.shard_map().table_version
    try:
        # publish a version whose answers are recognisably different: ablate some rows
        table.set_ablated(torch.arange(0, 10), True)
        v_new = table.snapshot()
        table.set_ablated(torch.arange(0, 10), False)
        v_old = table.snapshot()
        cluster.swap(v_old)
        old_ans, failures, calls = probe(table), [], [0]
        stop = threading.Event()

        def hammer():
            client = cluster.table()
            try:
                while not stop.is_set():
                    try:
                        probe(client)
                        calls[0] += 1
                    except Exception as e:  # noqa: BLE001 - counted, the test asserts none
                        failures.append(repr(e))
            finally:
                client.close()

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        cluster.swap(v_new)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert failures == [] and calls[0] > 0
        new_ans = probe(table)
        assert not torch.equal(new_ans[0], old_ans[0])  # ablated rows are gone from search
        assert not bool((new_ans[0] < 10).any() & (new_ans[0] >= 0).any())
    finally:
        table.close()
    assert serving >= 1


def test_swap_one_shard_composes_a_version(cluster):
    table = cluster.table()
    try:
        table.set_ablated(torch.arange(table.info().num_rows), False)  # earlier tests ablated some
        base = table.snapshot()
        cluster.swap(base)
        owner1 = cluster.shard_map().entries[1]
        ids1 = torch.arange(owner1.row_start, owner1.row_start + 3)
        ids0 = torch.arange(0, 3)
        table.set_ablated(torch.cat([ids0, ids1]), True)
        edited = table.snapshot()
        cluster.swap(base)
        v = cluster.swap(edited, shard=1)  # only shard 1's rows come from `edited`
        use = table.usage()
        assert bool(use.ablated[ids1].all()) and not bool(use.ablated[ids0].any())
        assert v not in (base, edited) and v in persistence.list_versions(cluster.config.store_root)
    finally:
        table.close()


def test_swap_to_a_version_with_another_shard_count(cluster):
    from store_service import errors

    def fresh(check):
        table = cluster.table()          # a new client: the layout just changed
        try:
            return check(table)
        finally:
            table.close()

    def ablate_and_publish(table):
        table.set_ablated(torch.arange(table.info().num_rows), False)   # earlier tests ablated some
        table.set_ablated(torch.arange(0, 4), True)
        version, answers = table.snapshot(), probe(table)   # a 2-shard version, recognisable by its ablations
        table.set_ablated(torch.arange(0, 4), False)
        return version, answers

    two, expected = fresh(ablate_and_publish)
    cluster.scale(3, drain_s=0.5)
    assert not fresh(lambda t: bool(t.usage().ablated.any()))
    with pytest.raises(errors.FailedPrecondition, match="kstore scale 2"):
        cluster.swap(two, shard=0)                   # one shard of another layout: refused, saying how
    serving = cluster.swap(two)                      # the whole table: re-partitioned onto the 3 shards
    assert serving != two and cluster.shard_map().num_shards == 3
    assert len(persistence.read_root_attrs(cluster.config.store_root, serving)["shards"]) == 3
    assert fresh(lambda t: bool(t.usage().ablated[:4].all()) and int(t.usage().ablated.sum()) == 4)
    assert_same(expected, fresh(probe))
    with pytest.raises(errors.NotFound, match="no published version 999"):
        cluster.swap(999)
    cluster.scale(2, drain_s=0.5)
