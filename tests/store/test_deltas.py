"""Incremental versions (store_service.deltas, snapshots): a version written as the rows
changed since its parent reads bitwise as the full version; chains and compaction; a crash
mid-publish; every writer of a persisted row marks it; the raw chunk files zarr reads."""
import os
import shutil

import numpy as np
import pytest
import torch
import zarr

from store_service import chunk_io, deltas, persistence, versions
from store_service.config import OptimizerConfig, TableConfig
from store_service.shard import Shard
from store_service.table import Table
from store_service.testing import served_table


def _cfg(**kw):
    base = dict(d_k=8, d_v=16, segments=[("product", 6), ("flat", 40)], store_codebooks=True, num_shards=2,
                bias_step=0.01, optimizer=OptimizerConfig("adam", lr=0.01))
    base.update(kw)
    return TableConfig(**base)


def _train(t: Table, rows: list[int], seed: int) -> None:
    """One step whose gradients reach exactly `rows` (and the flat keys among them)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(rows).reshape(-1, 1)
    w = torch.rand(ids.shape[0], 1, generator=gen) + 0.1
    t.readout(ids, w)
    t.readout_backward(ids, w, torch.randn(ids.shape[0], 16, generator=gen))
    flat = [r for r in rows if r >= 36]
    if flat:
        t.accumulate_key_grads(torch.tensor(flat), torch.randn(len(flat), 8, generator=gen))
    t.end_step(t.info().step)


def _live(t: Table) -> list[dict[str, np.ndarray]]:
    return [sh.state_dict() for sh in t.shards]


def _read(root: str, version: int) -> list[dict[str, np.ndarray]]:
    vdir = persistence.version_path(root, version)
    return [{n: torch.from_numpy(a.copy()) for n, a in persistence.read_shard(vdir, s["shard_id"]).arrays.items()}
            for s in persistence.read_root_attrs(root, version)["shards"]]


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _formats(root: str, version: int) -> list[int]:
    vdir = persistence.version_path(root, version)
    return [persistence.shard_format(vdir, s["shard_id"]) for s in persistence.read_root_attrs(root, version)["shards"]]


@pytest.mark.parametrize("value_dtype,kind", [("bfloat16", "adam"), ("float32", "sgd")])
def test_delta_version_reads_bitwise_as_the_full_one(tmp_path, value_dtype, kind):
    root = str(tmp_path)
    t = Table.create(_cfg(value_dtype=value_dtype, optimizer=OptimizerConfig(kind, lr=0.05)), root)
    v1 = t.snapshot()
    assert _formats(root, v1) == [2, 2]                      # a fresh table has no base
    _train(t, [1, 7, 30, 40, 44], seed=1)
    t.add_rows(torch.randn(3, 16), torch.randn(3, 8), tags={"src": torch.tensor([5, -1, 7])}, partition=1)
    v2 = t.snapshot()
    assert _formats(root, v2) == [3, 3]
    root_attrs = persistence.read_root_attrs(root, v2)
    assert root_attrs["format"] == 3 and root_attrs["delta_parents"] == [v1]
    v3 = t.snapshot(full=True)
    assert _formats(root, v3) == [2, 2]
    _assert_equal(_read(root, v2), _read(root, v3))
    _assert_equal(_read(root, v2), _live(t))
    # a table opened from the delta serves the same rows and answers the same
    t2 = Table.open(root, v2)
    _assert_equal(_live(t2), _live(t))
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    a, b = t.search(q, 5), t2.search(q, 5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_delta_holds_only_the_changed_rows(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(bias_step=0.0), root)
    t.snapshot()
    t2 = Table.open(root)
    _train(t2, [2, 9, 41], seed=4)
    v = t2.snapshot()
    got = {}
    for s in persistence.read_root_attrs(root, v)["shards"]:
        g = zarr.open_group(persistence.version_path(root, v), mode="r")[persistence.shard_group_name(s["shard_id"])]
        got[s["shard_id"]] = (s["row_start"], g["delta_rows"][...].tolist(), g["values"].shape[0],
                              g.attrs["delta_full_arrays"])
    changed = sorted(r for lo, rows, _, _ in got.values() for r in (lo + np.array(rows)).tolist())
    assert changed == [2, 9, 41]
    assert all(n == len(rows) for _, rows, n, _ in got.values())
    assert all(not any(n in deltas.ROW_ARRAYS for n in full) for *_, full in got.values())


def test_chain_of_three_deltas_then_compaction(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    v1 = t.snapshot()
    t = Table.open(root, v1)   # a loaded table: its base is v1
    expected = {}
    for i, rows in enumerate(([0, 5, 37], [5, 20, 38, 45], [1, 36])):
        _train(t, rows, seed=10 + i)
        t.set_frozen(torch.tensor([rows[0]]), i % 2 == 0)
        v = t.snapshot()
        expected[v] = _live(t)
        chain = [persistence.shard_attrs(persistence.version_path(root, v), s)["chain"] for s in (0, 1)]
        assert chain == [i + 1, i + 1] and _formats(root, v) == [3, 3]
    for v, want in expected.items():
        _assert_equal(_read(root, v), want)
    last = max(expected)
    versions.compact(root, last)
    assert _formats(root, last) == [2, 2]
    _assert_equal(_read(root, last), expected[last])
    # the parents may go once their child is compacted
    for v in [v1] + sorted(expected)[:-1]:
        shutil.rmtree(persistence.version_path(root, v))
    _assert_equal(_read(root, last), expected[last])
    # the serving table's next snapshot is a delta over the compacted version, still bitwise
    _train(t, [3, 39], seed=20)
    v5 = t.snapshot()
    assert _formats(root, v5) == [3, 3]
    _assert_equal(_read(root, v5), _live(t))


def test_a_delta_whose_parent_is_gone_says_so(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    v1 = t.snapshot()
    t = Table.open(root, v1)
    _train(t, [4], seed=1)
    v2 = t.snapshot()
    shutil.rmtree(persistence.version_path(root, v1))
    with pytest.raises(persistence.errors.FailedPrecondition, match="not published"):
        Table.open(root, v2)


def test_chain_is_written_in_full_after_max_chain(tmp_path, monkeypatch):
    monkeypatch.setattr(deltas, "MAX_CHAIN", 2)
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    t.snapshot()
    t = Table.open(root)
    formats = []
    for i in range(4):
        _train(t, [i, 40 + i], seed=i)
        formats.append(_formats(root, t.snapshot())[0])
    assert formats == [3, 3, 2, 3]


def test_crash_mid_incremental_publish_leaves_the_parent_and_loses_no_change(tmp_path, monkeypatch):
    root = str(tmp_path)
    t = Table.create(_cfg(num_shards=3), root)
    v1 = t.snapshot()
    t = Table.open(root, v1)
    _train(t, [2, 11, 25, 41], seed=1)
    v2 = t.snapshot()
    parent = _read(root, v2)
    _train(t, [3, 12, 44], seed=2)
    real = chunk_io._write_chunk
    calls = {"n": 0}

    def failing(path, part, chunk_bytes):
        calls["n"] += 1
        if calls["n"] == 7:   # part-way through the second shard's delta
            raise OSError("disk full")
        return real(path, part, chunk_bytes)
    monkeypatch.setattr(chunk_io, "_write_chunk", failing)
    with pytest.raises(OSError, match="disk full"):
        t.snapshot()
    monkeypatch.setattr(chunk_io, "_write_chunk", real)
    assert persistence.list_versions(root) == [v1, v2]           # no half version published
    assert os.listdir(os.path.join(root, "staging")) == []
    _assert_equal(_read(root, v2), parent)                      # the parent untouched
    # the rows of the failed snapshot are in the next one (a delta over v2 still)
    _train(t, [5], seed=3)
    v3 = t.snapshot()
    assert v3 == v2 + 1 and _formats(root, v3) == [3, 3, 3]
    _assert_equal(_read(root, v3), _live(t))


def _writers():
    """Each writer of persisted rows, alone, on a table loaded from its last version."""
    g = torch.Generator().manual_seed(0)
    return {
        "step_values": lambda t: _train(t, [1, 33], seed=5),
        "step_keys": lambda t: (t.accumulate_key_grads(torch.tensor([42]), torch.randn(1, 8, generator=g)),
                                t.end_step(t.info().step)),
        "readout_usage": lambda t: t.readout(torch.tensor([[4, 38]]), torch.tensor([[0.5, 0.0]])),
        "fetch_usage": lambda t: t.fetch(torch.tensor([6, 39]), hits=torch.tensor([2, 1]),
                                         weight_sum=torch.tensor([0.5, 0.25], dtype=torch.float64)),
        "add_rows": lambda t: t.add_rows(torch.randn(2, 16, generator=g), torch.randn(2, 8, generator=g),
                                         tags={"new": torch.tensor([1, 2])}),
        "freeze": lambda t: t.set_frozen(torch.tensor([8, 43])),
        "ablate": lambda t: t.set_ablated(torch.tensor([9, 44])),
        "balancing": lambda t: (t.readout(torch.tensor([[37, 38]]), torch.tensor([[1.0, 1.0]])),
                                t.end_step(t.info().step)),
        "set_optimizer": lambda t: (t.set_optimizer(OptimizerConfig("adam", lr=0.1)), _train(t, [2], seed=6)),
    }


@pytest.mark.parametrize("writer", sorted(_writers()))
def test_every_writer_marks_the_rows_it_changes(tmp_path, writer):
    root = str(tmp_path)
    t = Table.create(_cfg(optimizer=OptimizerConfig("sgd", lr=0.1)), root)
    _train(t, [0, 37], seed=1)
    t.snapshot()
    t = Table.open(root)
    before = _live(t)
    _writers()[writer](t)
    after = _live(t)
    assert any(not torch.equal(before[i][k], after[i].get(k, before[i][k])) or before[i].keys() != after[i].keys()
               for i in range(2) for k in before[i]), "the writer changed nothing"
    v = t.snapshot()
    _assert_equal(_read(root, v), after)


def test_remote_shards_write_deltas_and_full_on_request(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    v1 = t.snapshot()
    with served_table(root, v1) as remote:
        remote.set_frozen(torch.tensor([3, 40]))
        v2 = remote.snapshot()
        v3 = remote.snapshot(full=True)
    assert _formats(root, v2) == [3, 3] and _formats(root, v3) == [2, 2]
    _assert_equal(_read(root, v2), _read(root, v3))


def test_versions_written_before_content_ids_get_a_full_snapshot_first(tmp_path):
    root = str(tmp_path)
    t = Table.create(_cfg(), root)
    v1 = t.snapshot()
    for s in (0, 1):   # as an older writer left it
        g = zarr.open_group(persistence.version_path(root, v1), mode="a")[persistence.shard_group_name(s)]
        g.attrs.update({"content_id": None})
    t = Table.open(root, v1)
    t.set_ablated(torch.tensor([2]))
    assert _formats(root, t.snapshot()) == [2, 2]


@pytest.mark.parametrize("shape,dtype", [((37, 5), np.float32), ((0, 4), np.uint16), ((1001,), np.bool_),
                                         ((300, 3), np.int64)])
def test_raw_chunk_files_are_zarrs_own(tmp_path, monkeypatch, shape, dtype):
    monkeypatch.setattr(chunk_io, "CHUNK_BYTES", 64)   # many chunks, the last one partial
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 1000, size=shape) % (2 if dtype == np.bool_ else 1000)).astype(dtype)
    g = zarr.open_group(str(tmp_path / "g"), mode="w")
    chunk_io.wait(chunk_io.write_array(g, "a", arr))
    z = zarr.open_group(str(tmp_path / "g"), mode="r")["a"]
    assert z.dtype == arr.dtype and np.array_equal(z[...], arr)           # zarr reads our files
    assert chunk_io._is_raw(z)
    got = chunk_io.read_tensor(z)
    assert np.array_equal(got.numpy().view(arr.dtype), arr)                # and we read zarr's layout
    staged = torch.full(got.shape, 7, dtype=got.dtype) if got.dtype != torch.bool else torch.ones(got.shape, dtype=torch.bool)
    chunk_io.read_into(z, staged, staged=True)                             # the GPU path's staging buffers
    assert torch.equal(staged, got)
    # an array zarr wrote compressed is read through zarr
    zc = g.create_array("c", data=arr) if arr.size else None
    if zc is not None:
        assert not chunk_io._is_raw(zc)
        assert np.array_equal(chunk_io.read_tensor(zc).numpy().view(arr.dtype), arr)
