"""Tags and partitions (interface.py): kept with flat rows, returned by a search, used as a
filter; rows of partitions >= 1 stay out of the top-k and of balancing and are found by a
side query (cos(q, key) + bias). The same in process, over gRPC and after a snapshot."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from store_service import errors, versions
from store_service.config import OptimizerConfig, TableConfig
from store_service.interface import SideQuery, TagFilter
from store_service.shard import Shard
from store_service.table import Table
from store_service.testing import served_table

TAGS = ("topic", "owner")


def _cfg(**kw) -> TableConfig:
    base = dict(d_k=8, d_v=4, segments=[("product", 4), ("flat", 20)], store_codebooks=True, num_shards=3,
                seed=1, bias_step=0.0, optimizer=OptimizerConfig("sgd", lr=0.1))
    base.update(kw)
    return TableConfig(**base)


def _add_tagged(table, seed: int = 0):
    """12 rows: 8 in partition 0 (tagged in part), 3 in partition 1, 1 in partition 2."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(12, 8, generator=g) * 3
    bias = torch.linspace(-0.2, 0.2, 12)
    tags = {"topic": torch.tensor([0, 0, 1, 1, 2, -1, -1, -1, 5, 5, 6, 7]),
            "owner": torch.tensor([-1, 3, -1, 3, -1, -1, 4, -1, 3, -1, -1, 3])}
    partition = torch.tensor([0] * 8 + [1, 1, 1, 2])
    ids = table.add_rows(torch.randn(12, 4, generator=g), keys, bias, tags=tags, partition=partition)
    return ids, keys, bias, tags, partition


def _rows(table: Table):
    """Every row the store searches: ids, keys, bias, partition and tags, by brute force
    from the shards' persisted state (product rows: their sub-keys; partition 0, untagged)."""
    ids, keys, bias, part = [], [], [], []
    tags = {name: [] for name in TAGS}
    for sh in table.shards:
        sd, d = sh.state_dict(), sh.describe()
        f = sd["flat_ids"].numel()
        ids.append(sd["flat_ids"])
        keys.append(sd["keys"])
        bias.append(sd["flat_bias"])
        part.append(sd["flat_partition"])
        for name in TAGS:
            tags[name].append(sd.get(f"tag_{name}", torch.full((f,), -1)))
        for si, seg in enumerate(d.segments):
            if f"pk{si}_codebook_a" in sd:
                g = torch.arange(max(d.info.row_start, seg.row_start), min(d.info.row_end, seg.row_end))
                i, j = (g - seg.row_start) // seg.n_sub, (g - seg.row_start) % seg.n_sub
                ids.append(g)
                keys.append(torch.cat([sd[f"pk{si}_codebook_a"][i], sd[f"pk{si}_codebook_b"][j]], 1))
                bias.append(sd[f"pk{si}_bias_a"][i] + sd[f"pk{si}_bias_b"][j])
                part.append(torch.zeros_like(g))
                for name in TAGS:
                    tags[name].append(torch.full_like(g, -1))
    ids = torch.cat(ids)
    ablated = table.usage().ablated[ids]
    return (ids, torch.cat(keys), torch.cat(bias), torch.cat(part), {n: torch.cat(t) for n, t in tags.items()},
            ablated)


def _reference(table, q, k, *, partition=0, where=None):
    """The k best rows of `partition` (0: by q.k + b; else by cos(q, k) + b) passing `where`."""
    ids, keys, bias, part, tags, ablated = _rows(table)
    keep = (part == partition) & ~ablated
    if where is not None:
        t = tags.get(where.name, torch.full_like(ids, -1))
        keep &= (t >= 0) & (torch.isin(t, torch.tensor(where.values)) if where.values else True)
    qq = q if partition == 0 else F.normalize(q, dim=-1)
    s = (qq @ keys.T + bias).masked_fill(~keep, float("-inf"))
    top, pos = s.topk(k, dim=1)
    pad = torch.isneginf(top)
    return (ids[pos].masked_fill(pad, -1), top, {n: t[pos].masked_fill(pad, -1) for n, t in tags.items()})


def _same(res, want):
    ids, scores, tags = want
    assert torch.equal(res.ids, ids)
    torch.testing.assert_close(res.scores, scores)
    for name in tags:
        assert torch.equal(res.tags[name], tags[name]), name


def _queries(keys, seed=3):
    return torch.cat([keys, torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)) * 2])


def test_search_returns_tags_and_leaves_other_partitions_out_of_the_top_k():
    table = Table.create(_cfg())
    ids, keys, bias, tags, partition = _add_tagged(table)
    info = table.info()
    assert info.tag_rows == {"owner": 5, "topic": 9} and info.partition_rows == {1: 3, 2: 1}
    assert sum(s.partition_rows.get(1, 0) for s in info.shards) == 3
    q = _queries(keys)
    res = table.search(q, 7, tags=TAGS, want_keys=True)
    _same(res, _reference(table, q, 7))
    assert res.side is None and res.keys.shape == (q.shape[0], 7, 8)
    assert not bool(torch.isin(res.ids, ids[8:]).any())        # not even for their own keys
    assert table.search(q, 7).tags == {}                        # tags only when asked
    unknown = table.search(q, 7, tags=("nobody",))              # a name no row holds: unset everywhere
    assert bool((unknown.tags["nobody"] == -1).all())


def test_side_query_is_cosine_plus_bias_over_one_partition():
    table = Table.create(_cfg())
    ids, keys, *_ = _add_tagged(table)
    q = _queries(keys)
    res = table.search(q, 5, tags=TAGS, side=SideQuery(1, 2))
    _same(res, _reference(table, q, 5))
    _same(res.side, _reference(table, q, 2, partition=1))
    assert res.side.keys is None and res.side.side is None
    wide = table.search(q, 5, tags=TAGS, side=SideQuery(1, 4)).side     # more asked than there are: padded
    assert bool((wide.ids[:, 3:] == -1).all() and torch.isneginf(wide.scores[:, 3:]).all())
    assert bool((wide.tags["topic"][:, 3:] == -1).all())
    _same(table.search(q, 5, tags=TAGS, side=SideQuery(2, 1)).side, _reference(table, q, 1, partition=2))
    assert bool((table.search(q, 5, side=SideQuery(9, 2)).side.ids == -1).all())   # an empty partition
    table.set_ablated(ids[8:9])                                 # ablated rows are not found
    side = table.search(q, 5, tags=TAGS, side=SideQuery(1, 3)).side
    assert not bool((side.ids == ids[8]).any())
    _same(side, _reference(table, q, 3, partition=1))


@pytest.mark.parametrize("faiss_threshold", [0, 1])
def test_tag_filter_keeps_rows_with_the_tag_set(faiss_threshold):
    if faiss_threshold:
        pytest.importorskip("faiss")
    table = Table.create(_cfg(faiss_threshold=faiss_threshold))
    ids, keys, *_ = _add_tagged(table)
    q = _queries(keys)
    table.search(q, 5)                         # with faiss: an index built without a filter
    for where in (TagFilter("topic"), TagFilter("topic", (1, 2)), TagFilter("owner", (3,)), TagFilter("x")):
        res = table.search(q, 4, tags=TAGS, where=where, side=SideQuery(1, 2))
        _same(res, _reference(table, q, 4, where=where))
        _same(res.side, _reference(table, q, 2, partition=1, where=where))   # the side query too
        assert bool((res.ids < 16).logical_and(res.ids >= 0).sum() == 0)     # product rows have no tags
    _same(table.search(q, 5, tags=TAGS), _reference(table, q, 5))          # and without a filter again


def test_balancing_leaves_other_partitions_alone():
    table = Table.create(_cfg(bias_step=0.1, num_shards=1))
    ids, _, bias, *_ = _add_tagged(table)
    reads = torch.cat([ids[:2], ids[8:10]])[None]
    table.readout(reads, torch.ones(1, 4))
    table.end_step(0)
    after = table.shards[0].state_dict()["flat_bias"][-12:]
    assert torch.equal(after[8:], bias[8:])                   # partitions 1, 2: where the caller put them
    torch.testing.assert_close(after[:2], bias[:2] - 0.1)     # read rows of partition 0 went down
    torch.testing.assert_close(after[2:8], bias[2:8] + 0.1)   # the others up


def test_tags_and_partitions_survive_snapshot_reload_and_repartition(tmp_path):
    table = Table.create(_cfg(), str(tmp_path))
    ids, keys, *_ = _add_tagged(table)
    table.add_rows(torch.randn(2, 4), torch.randn(2, 8), tags={"late": torch.tensor([-1, 9])})
    q = _queries(keys)
    want = table.search(q, 6, tags=TAGS + ("late",), side=SideQuery(1, 3))
    v = table.snapshot()
    reloaded = Table.open(str(tmp_path), v)
    resplit = Table.open(str(tmp_path), versions.repartition(str(tmp_path), v, 2))
    assert len(resplit.shards) == 2
    for again in (reloaded, resplit):
        info = again.info()
        assert info.tag_rows == {"late": 1, "owner": 5, "topic": 9} and info.partition_rows == {1: 3, 2: 1}
        got = again.search(q, 6, tags=TAGS + ("late",), side=SideQuery(1, 3))
        for a, b in ((got, want), (got.side, want.side)):
            assert torch.equal(a.ids, b.ids) and all(torch.equal(a.tags[n], b.tags[n]) for n in b.tags)
            if again is reloaded:
                assert torch.equal(a.scores, b.scores)
            else:   # the same rows, scored by matmuls over other slices of them
                torch.testing.assert_close(a.scores, b.scores)


def test_tags_over_grpc_equal_in_process(tmp_path):
    root = str(tmp_path)
    local = Table.create(_cfg(), root)
    v = local.snapshot()
    local = Table.open(root, v)
    with served_table(root, v) as remote:
        for t in (local, remote):
            ids, keys, *_ = _add_tagged(t)
        assert remote.info().tag_rows == local.info().tag_rows
        assert remote.info().partition_rows == local.info().partition_rows
        q = _queries(keys)
        for kw in (dict(tags=TAGS, side=SideQuery(1, 2)), dict(tags=("owner",), where=TagFilter("topic", (0, 5))),
                   dict(side=SideQuery(2, 3))):
            a, b = local.search(q, 6, **kw), remote.search(q, 6, **kw)
            for x, y in ((a, b), (a.side, b.side)):
                if x is None:
                    assert y is None
                    continue
                assert torch.equal(x.ids, y.ids) and torch.equal(x.scores, y.scores)
                assert x.tags.keys() == y.tags.keys() and all(torch.equal(x.tags[n], y.tags[n]) for n in x.tags)
        with pytest.raises(errors.InvalidArgument) as e:
            remote.add_rows(torch.zeros(1, 4), torch.zeros(1, 8), tags={"topic": torch.tensor([-3])})
        assert e.value.field == "tags[topic]"


BAD_ADDS = [
    ("tags", dict(tags={"Topic": torch.tensor([1])})),
    ("tags", dict(tags={"a" * 33: torch.tensor([1])})),
    ("tags", dict(tags=[("topic", torch.tensor([1]))])),
    ("tags[topic]", dict(tags={"topic": torch.tensor([1], dtype=torch.int32)})),
    ("tags[topic]", dict(tags={"topic": torch.tensor([1, 2])})),
    ("tags[topic]", dict(tags={"topic": torch.tensor([-2])})),
    ("partition", dict(partition=-1)),
    ("partition", dict(partition=True)),
    ("partition", dict(partition=torch.tensor([1.0]))),
    ("partition", dict(partition=torch.tensor([-1]))),
    ("tags", dict(tags={f"t{i}": torch.tensor([0]) for i in range(17)})),
]
BAD_SEARCHES = [
    ("tags", dict(tags="topic")),
    ("tags", dict(tags=("topic", "topic"))),
    ("tags", dict(tags=("no-dash",))),
    ("where", dict(where="topic")),
    ("where.name", dict(where=TagFilter("Topic"))),
    ("where.values", dict(where=TagFilter("topic", [1]))),
    ("where.values", dict(where=TagFilter("topic", (1, -1)))),
    ("side", dict(side=(1, 2))),
    ("side.partition", dict(side=SideQuery(0, 2))),
    ("side.k", dict(side=SideQuery(1, 0))),
    ("side.k", dict(side=SideQuery(1, 10_000))),
]


@pytest.mark.parametrize("field,kw", BAD_ADDS)
def test_bad_tags_or_partition_are_refused_and_change_nothing(field, kw):
    for target in (Shard(_cfg(num_shards=1)), Table.create(_cfg())):
        before = target.describe().info if isinstance(target, Shard) else target.info()
        with pytest.raises(errors.InvalidArgument) as e:
            target.add_rows(torch.zeros(1, 4), torch.zeros(1, 8), **kw)
        assert e.value.field == field
        after = target.describe().info if isinstance(target, Shard) else target.info()
        assert after == before


@pytest.mark.parametrize("field,kw", BAD_SEARCHES)
def test_bad_search_options_are_refused(field, kw):
    for target in (Shard(_cfg(num_shards=1)), Table.create(_cfg())):
        with pytest.raises(errors.InvalidArgument) as e:
            target.search(torch.randn(2, 8), 3, **kw)
        assert e.value.field == field


def test_a_table_holds_at_most_16_tag_names():
    table = Table.create(_cfg())
    table.add_rows(torch.zeros(1, 4), torch.zeros(1, 8), tags={f"t{i}": torch.tensor([i]) for i in range(16)})
    table.add_rows(torch.zeros(1, 4), torch.zeros(1, 8), tags={"t3": torch.tensor([1])})   # a name it holds
    with pytest.raises(errors.InvalidArgument, match="at most 16"):
        table.add_rows(torch.zeros(1, 4), torch.zeros(1, 8), tags={"t16": torch.tensor([1])})
    assert len(table.info().tag_rows) == 16
