"""Zarr versions: bitwise round trip, atomic publish, repartition, the format-1 reader."""
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
import zarr

from store_service import errors, persistence, versions
from store_service.config import OptimizerConfig, TableConfig
from store_service.interface import SideQuery
from store_service.shard import Shard
from store_service.table import Table


def _cfg(num_shards=3, **kw):
    base = dict(d_k=8, d_v=16, segments=[("product", 6), ("flat", 40)], store_codebooks=True,
                num_shards=num_shards, bias_step=0.01, optimizer=OptimizerConfig("adam", lr=0.01))
    base.update(kw)
    return TableConfig(**base)


def _train(t: Table, steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = t.info().num_rows
    for _ in range(steps):
        ids = torch.randint(-1, n, (10, 4), generator=gen)
        w = torch.rand(10, 4, generator=gen)
        t.readout(ids, w)
        t.readout_backward(ids, w, torch.randn(10, 16, generator=gen))
        t.accumulate_key_grads(torch.tensor([40, 41, 70]), torch.randn(3, 8, generator=gen))
        t.end_step(t.info().step)


def _state(t: Table):
    return [dict(sh.state_dict(), step=torch.tensor(sh.describe().info.step)) for sh in t.shards]


def _assert_states_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("value_dtype,kind", [("float32", "adam"), ("bfloat16", "adam"), ("float32", "sgd")])
def test_round_trip_is_bitwise(tmp_path, value_dtype, kind):
    t = Table.create(_cfg(value_dtype=value_dtype, optimizer=OptimizerConfig(kind, lr=0.05)), str(tmp_path))
    _train(t)
    t.add_rows(torch.randn(3, 16), torch.randn(3, 8))
    t.set_frozen(torch.tensor([2, 50]))
    t.set_ablated(torch.tensor([3, 77]))
    v = t.snapshot()
    assert persistence.list_versions(str(tmp_path)) == [v] and persistence.latest_version(str(tmp_path)) == v
    root = persistence.read_root_attrs(str(tmp_path), v)
    assert root["version"] == v and root["step"] == 2 and len(root["shards"]) == 3
    assert root["optimizer"]["kind"] == kind and root["segments"][-1]["num_rows"] == 43
    u = Table.open(str(tmp_path))
    _assert_states_equal(_state(t), _state(u))
    assert u.info().num_rows == 79 and u.info().step == 2 and u.info().version == v
    assert torch.equal(u.fetch(torch.arange(79)), t.fetch(torch.arange(79)))
    for f in ("hits", "weight_sum", "frozen", "ablated"):
        assert torch.equal(getattr(u.usage(), f), getattr(t.usage(), f))
    # the loaded table trains on exactly as the original would
    _train(t, 1, seed=5)
    _train(u, 1, seed=5)
    _assert_states_equal(_state(t), _state(u))
    if value_dtype == "bfloat16":
        z = persistence.read_shard(persistence.version_path(str(tmp_path), v), 0)
        assert str(z.arrays["values"].dtype) == "uint16" and z.attrs["value_dtype"] == "bfloat16"


def test_crash_mid_write_leaves_no_visible_version(tmp_path, monkeypatch):
    t = Table.create(_cfg(), str(tmp_path))
    v1 = t.snapshot()
    real = Shard.write_snapshot

    def crash(self, version_dir, version, **kw):
        if self.shard_id == 2:
            raise OSError("disk full")
        return real(self, version_dir, version, **kw)
    monkeypatch.setattr(Shard, "write_snapshot", crash)
    with pytest.raises(OSError):
        t.snapshot()
    assert persistence.list_versions(str(tmp_path)) == [v1]
    assert os.listdir(os.path.join(str(tmp_path), "staging")) == []
    monkeypatch.setattr(Shard, "write_snapshot", real)
    assert t.snapshot() == v1 + 1
    # an existing version is never overwritten
    with pytest.raises(errors.FailedPrecondition):
        with persistence.staged_version(str(tmp_path), v1):
            pass


def test_list_versions_ignores_other_names(tmp_path):
    os.makedirs(tmp_path / "versions" / "v00000003")
    os.makedirs(tmp_path / "versions" / "v3-tmp")
    os.makedirs(tmp_path / "staging" / "v00000009-abc")
    assert persistence.list_versions(str(tmp_path)) == [3]
    assert persistence.latest_version(str(tmp_path / "nothing")) is None
    with pytest.raises(errors.NotFound):
        Table.open(str(tmp_path / "nothing"))


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_repartition_preserves_every_row_bitwise(tmp_path, num_shards):
    # bias_step=0: second-codebook biases are balanced per shard, so with balancing on
    # a re-split table may rank product rows differently (rows themselves move bitwise).
    t = Table.create(_cfg(bias_step=0.0), str(tmp_path))
    _train(t)
    t.set_frozen(torch.tensor([7]))
    t.set_ablated(torch.tensor([8, 60]))
    v = t.snapshot()
    v2 = versions.repartition(str(tmp_path), v, num_shards)
    assert v2 == v + 1
    u = Table.open(str(tmp_path), v2)
    assert len(u.shards) == num_shards and u.info().step == t.info().step
    for lo_hi in (sh.describe().info for sh in u.shards):  # product rows stay whole per shard
        assert lo_hi.row_start >= 36 or lo_hi.row_start % 6 == 0

    def cat(table, name):
        return torch.cat([sh.state_dict()[name] for sh in sorted(
            table.shards, key=lambda s: s.describe().info.row_start)])
    for name in ("values", "frozen", "ablated", "hits", "weight_sum", "opt_steps", "opt_m", "opt_v",
                 "flat_ids", "keys", "flat_bias", "key_steps", "key_m", "key_v"):
        assert torch.equal(cat(t, name), cat(u, name)), name
    q = torch.randn(6, 8)
    assert torch.equal(t.search(q, 5).ids, u.search(q, 5).ids)
    assert torch.equal(t.fetch(torch.arange(76)), u.fetch(torch.arange(76)))


def test_compose_version_takes_one_shard_from_another_version(tmp_path):
    t = Table.create(_cfg(), str(tmp_path))
    v1 = t.snapshot()
    before = _state(t)
    _train(t)
    v2 = t.snapshot()
    after = _state(t)
    v3 = versions.compose_version(str(tmp_path), v2, {1: v1})
    u = Table.open(str(tmp_path), v3)
    got = _state(u)
    for sid, want in ((0, after[0]), (1, before[1]), (2, after[2])):
        for k in want:
            if k != "step":
                assert torch.equal(got[sid][k], want[k]), (sid, k)
    assert u.info().version == v3 and persistence.read_root_attrs(str(tmp_path), v3)["step"] == 0
    t.add_rows(torch.ones(1, 16), torch.ones(1, 8))
    v4 = t.snapshot()
    with pytest.raises(errors.InvalidArgument):
        versions.compose_version(str(tmp_path), v1, {2: v4})  # shard 2 grew: another layout



# -- format 1: versions written before tags and partitions ------------------------------------

DATA = pathlib.Path(__file__).parents[1] / "data"
FORMAT1 = torch.load(DATA / "format1_answers.pt")   # what the pre-restructure store answered


def _format1_store(tmp_path) -> str:
    """A copy of tests/data/format1_store (written by the store at commit 03059be: labels as
    flat_cue / flat_gate, no partitions; make_format1_store.py)."""
    root = str(tmp_path / "store")
    shutil.copytree(DATA / "format1_store", root)
    return root


def test_format1_version_reads_as_tags_in_partition_0_and_is_written_as_format_2(tmp_path):
    root, v = _format1_store(tmp_path), FORMAT1["version"]
    vdir = persistence.version_path(root, v)
    assert [persistence.shard_format(vdir, s) for s in (0, 1)] == [1, 1]
    raw = zarr.open_group(vdir, mode="r")["shard_0001"]
    data = persistence.read_shard(vdir, 1)
    assert data.attrs["format"] == 2 and "flat_cue" not in data.arrays
    assert np.array_equal(data.arrays["tag_cue"], raw["flat_cue"][...])
    assert np.array_equal(data.arrays["tag_gate"], raw["flat_gate"][...])
    assert not data.arrays["flat_partition"].any() and data.arrays["flat_partition"].dtype == np.int64
    t = Table.open(root, v)
    assert t.info().tag_rows == {"cue": 7, "gate": 8} and t.info().partition_rows == {}
    assert torch.equal(t.fetch(torch.arange(40)), FORMAT1["fetch"])
    # written again, it is format 2, and reads back the same
    v2 = t.snapshot()
    assert persistence.read_root_attrs(root, v2)["format"] == 2
    assert persistence.shard_format(persistence.version_path(root, v2), 1) == 2
    _assert_states_equal(_state(t), _state(Table.open(root, v2)))
    # composing from a format-1 shard writes it in format 2 too
    v3 = versions.compose_version(root, v2, {1: v})
    assert persistence.shard_format(persistence.version_path(root, v3), 1) == 2
    _assert_states_equal(_state(Table.open(root, v3)), _state(t))
    with pytest.raises(errors.FailedPrecondition, match="format 2 only"):
        persistence.write_shard(str(tmp_path / "x"), persistence.ShardData(raw.attrs.asdict(), {}))


def test_format1_rows_with_both_labels_are_a_side_query_over_partition_1(tmp_path):
    """The old semantics map exactly: once the rows whose cue and gate are both set are
    moved to partition 1 (as the model side's migration does, here through
    versions.rewrite_version), search(q, k, tags=("cue", "gate"), side=SideQuery(1, m))
    answers what the pre-restructure store answered to search(q, k, detectors=m): ids, keys and
    tags bitwise, scores to float rounding."""
    root, v = _format1_store(tmp_path), FORMAT1["version"]

    def both_labels_to_partition_1(d: persistence.ShardData) -> persistence.ShardData:
        a = dict(d.arrays)
        a["flat_partition"] = ((a["tag_cue"] >= 0) & (a["tag_gate"] >= 0)).astype(np.int64)
        return persistence.ShardData(d.attrs, a)
    versions.rewrite_version(root, v, both_labels_to_partition_1)
    assert persistence.list_versions(root) == [v] and os.listdir(os.path.join(root, "staging")) == []
    assert persistence.read_root_attrs(root, v)["format"] == 2
    t = Table.open(root, v)
    assert t.info().partition_rows == {1: 5}
    res = t.search(FORMAT1["queries"], FORMAT1["k"], tags=("cue", "gate"), side=SideQuery(1, FORMAT1["m"]),
                 want_keys=True)
    for got, want in ((res.ids, "ids"), (res.scores, "scores"), (res.keys, "keys"), (res.tags["cue"], "cue"),
                      (res.tags["gate"], "gate"), (res.side.ids, "side_ids"), (res.side.scores, "side_scores"),
                      (res.side.tags["cue"], "side_cue"), (res.side.tags["gate"], "side_gate")):
        if got.is_floating_point():
            # scores come from a matmul whose rounding depends on the CPU's BLAS kernels (the
            # fixture was written on an Intel host; an AMD one differs in the last bits)
            torch.testing.assert_close(got, FORMAT1[want], rtol=1e-5, atol=1e-5, msg=want)
        else:
            assert torch.equal(got, FORMAT1[want]), want


# -- publish_permuted: rows moved to new ids ---------------------------------------------------

def _permutation_plan(gen: torch.Generator, n_sub: int, num_rows: int):
    """Codebook permutations (new sub-key -> old) and new_of_old for product rows [0, n^2)
    moved with them and flat rows shuffled within their segment."""
    perm_a, perm_b = torch.randperm(n_sub, generator=gen), torch.randperm(n_sub, generator=gen)
    old_of_new = (perm_a[:, None] * n_sub + perm_b[None, :]).reshape(-1)
    flat = n_sub * n_sub + torch.randperm(num_rows - n_sub * n_sub, generator=gen)
    old_of_new = torch.cat([old_of_new, flat])
    new_of_old = torch.empty_like(old_of_new)
    new_of_old[old_of_new] = torch.arange(num_rows)
    return new_of_old, perm_a, perm_b


def test_publish_permuted_moves_every_row_bitwise(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(num_shards=2, bias_step=0.0), root)
    g = torch.Generator().manual_seed(0)
    t.add_rows(torch.randn(6, 16, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g),
               tags={"topic": torch.tensor([0, -1, 2, 2, -1, 5])}, partition=torch.tensor([0, 0, 0, 1, 1, 0]))
    _train(t)
    t.set_frozen(torch.tensor([3, 41]))
    t.set_ablated(torch.tensor([7, 77]))
    v = t.snapshot()
    n = t.info().num_rows
    new_of_old, perm_a, perm_b = _permutation_plan(g, 6, n)
    v2 = versions.publish_permuted(root, v, new_of_old, {0: (perm_a, perm_b)})
    u = Table.open(root, v2)
    assert [s.describe().info.row_end for s in u.shards] == [s.describe().info.row_end for s in t.shards]
    assert u.info().tag_rows == t.info().tag_rows and u.info().partition_rows == t.info().partition_rows

    def whole(table, name, flat):
        parts = [sh.state_dict() for sh in table.shards]
        if not flat:
            return torch.cat([p[name] for p in parts])
        ids = torch.cat([p["flat_ids"] for p in parts])   # a tag a shard never held: unset on its rows
        return ids, torch.cat([p.get(name, torch.full_like(p["flat_ids"], -1)) for p in parts])
    for name in ("values", "frozen", "ablated", "hits", "weight_sum", "opt_steps", "opt_m", "opt_v"):
        old, new = whole(t, name, False), whole(u, name, False)
        assert torch.equal(new[new_of_old], old), name           # row r now lives at new_of_old[r]
    for name in ("keys", "flat_bias", "key_steps", "key_m", "key_v", "flat_partition", "tag_topic"):
        (old_ids, old), (new_ids, new) = whole(t, name, True), whole(u, name, True)
        assert torch.equal(new_ids, new_of_old[old_ids].sort().values)   # flat rows in id order
        at = {int(i): r for r, i in enumerate(new_ids)}
        assert torch.equal(new[torch.tensor([at[int(new_of_old[i])] for i in old_ids])], old), name
    # store-held codebooks were permuted alike: the same rows answer, under their new ids
    q = torch.randn(9, 8, generator=g)
    a, b = t.search(q, 6, tags=("topic",)), u.search(q, 6, tags=("topic",))
    assert torch.equal(b.ids, torch.where(a.ids >= 0, new_of_old[a.ids.clamp_min(0)], a.ids))
    torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-6)
    assert torch.equal(b.tags["topic"], a.tags["topic"])
    assert torch.equal(u.fetch(new_of_old), t.fetch(torch.arange(n)))


def test_publish_permuted_refuses_moves_the_codebooks_do_not_make(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(num_shards=2), root)
    v = t.snapshot()
    n = t.info().num_rows
    new_of_old, perm_a, perm_b = _permutation_plan(torch.Generator().manual_seed(1), 6, n)
    swapped = torch.arange(n)
    swapped[[0, 1]] = swapped[[1, 0]]                        # two product rows, no codebook permutation
    into_product = torch.arange(n)
    into_product[[0, 40]] = into_product[[40, 0]]           # a flat row into the product segment
    for args, field in (((new_of_old[:-1], {0: (perm_a, perm_b)}), "new_of_old"),
                        ((new_of_old * 0, {0: (perm_a, perm_b)}), "new_of_old"),
                        ((new_of_old, None), "new_of_old"),
                        ((swapped, None), "new_of_old"),
                        ((into_product, None), "new_of_old"),
                        ((new_of_old, {0: (perm_a, perm_b[:-1])}), "codebook_perms[0][1]"),
                        ((new_of_old, {1: (perm_a, perm_b)}), "codebook_perms")):
        with pytest.raises(errors.InvalidArgument) as e:
            versions.publish_permuted(root, v, *args)
        assert e.value.field == field
    assert persistence.list_versions(root) == [v]


def test_a_version_whose_values_have_another_width_is_refused_at_load(tmp_path):
    """bfloat16 values are stored as uint16 bits; those + a float are float64, read back four
    times as wide. Such a version is DataLoss at load, never served (a GPU shard would have
    written the wide rows past a client's CUDA IPC staging slot)."""
    root = str(tmp_path)
    cfg = TableConfig(d_k=4, d_v=8, segments=[("flat", 20)], value_dtype="bfloat16", seed=1)
    v1 = Table.create(cfg, root).snapshot()
    with persistence.staged_version(root, v1 + 1) as stage:
        data = persistence.read_shard(persistence.version_path(root, v1), 0)
        arrays = dict(data.arrays, values=data.arrays["values"] + 1000.0)   # the mistake
        persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=v1 + 1), arrays))
        persistence.finish_version(stage, v1 + 1)
    Shard.load(root, v1, 0)   # the version it came from loads
    with pytest.raises(errors.DataLoss, match=r"values.*\[20, 8\]"):
        Shard.load(root, v1 + 1, 0)
