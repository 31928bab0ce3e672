"""Known issue (found by benchmarks/ray_placement.py, STORE_NOTES "Ray placement on the GPU"):
Table.snapshot publishes version v2 but leaves the serving states labelled with the version
they were loaded from (v1). A swap back to v1 (a rollback) then has two states under one
number while the shards flip one after the other: a request pinned to v1 is answered by the
flipped shard from the published v1 and by the other from the trained state, and nothing
answers StaleVersion, so the table returns rows of two versions. The test steps through the
swap by hand (shard 0 flipped, shard 1 not yet) and asks for an answer wholly from one."""
import pytest
import torch

from store_service.config import TableConfig
from store_service.table import Table


@pytest.mark.xfail(strict=True, reason="snapshot does not relabel the serving states: a swap to their "
                                       "number can mix versions (STORE_NOTES, Ray placement on the GPU)")
def test_rollback_to_the_loaded_number_never_mixes(tmp_path):
    root = str(tmp_path)
    t = Table.create(TableConfig(d_k=8, d_v=16, segments=[("flat", 64)], num_shards=2), root)
    v1 = t.snapshot()
    t.close()
    t = Table.open(root, v1)
    try:
        ids = torch.arange(64)
        before = t.fetch(ids)
        t.accumulate_value_grads(ids, torch.ones(64, 16))
        t.end_step(t.info().step)
        after = t.fetch(ids)
        assert not torch.equal(before, after)
        t.snapshot()                               # v2: the trained rows
        s0 = t.shards[0]
        s0.prepare_version(root, v1)               # the rollback, half way: shard 0 flipped
        s0.flip_version(v1)
        got = t.fetch(ids)
        assert torch.equal(got, before) or torch.equal(got, after)
    finally:
        t.close()
