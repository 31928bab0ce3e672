"""Hot swap of a shard staged on the host: the new version is prepared in host memory, the
shards flip, the old version is freed, and only then do the new rows move onto the shard's
device, in place; meanwhile no call fails and no answer mixes versions."""
import threading
import weakref

import torch

from store_service import persistence
from store_service.config import TableConfig
from store_service.shard import Shard
from store_service.table import Table

SHIFT = 1000.0


def _publish_shifted(root, src, dst):
    shard_ids = [s["shard_id"] for s in persistence.read_root_attrs(root, src)["shards"]]
    with persistence.staged_version(root, dst) as stage:
        for sid in shard_ids:
            data = persistence.read_shard(persistence.version_path(root, src), sid)
            arrays = dict(data.arrays, values=data.arrays["values"] + SHIFT)
            persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=dst), arrays))
        persistence.finish_version(stage, dst)


def test_staged_swap_frees_the_old_version_before_moving_and_never_mixes(tmp_path, monkeypatch):
    root = str(tmp_path)
    cfg = TableConfig(d_k=8, d_v=16, segments=[("flat", 3000)], num_shards=3, bias_step=0.0, seed=2)
    v1 = Table.create(cfg, root).snapshot()
    v2 = v1 + 1
    _publish_shifted(root, v1, v2)
    table = Table.open(root, v1)
    ids = torch.arange(0, 3000, 7)
    want = {v: Table.open(root, v).fetch(ids) for v in (v1, v2)}
    for s in table.shards:
        s.stage_swaps_on_host = True      # as a GPU shard does (home device "cuda")

    old_values = [weakref.ref(s._serving.values) for s in table.shards]
    moves = []
    real_move = Shard._move

    def spy(st, device):
        # the staged version moves only once the old one's rows are gone
        moves.append((st.version, [r() is None for r in old_values]))
        real_move(st, device)
    monkeypatch.setattr(Shard, "_move", staticmethod(spy))

    stop, errs, seen = threading.Event(), [], {v1: 0, v2: 0}

    def reader():
        while not stop.is_set():
            try:
                got = table.fetch(ids)
            except Exception as e:  # noqa: BLE001 - any failure fails the test
                errs.append(e)
                return
            match = [v for v in (v1, v2) if torch.equal(got, want[v])]
            if len(match) != 1:
                errs.append(AssertionError("an answer mixing versions"))
                return
            seen[match[0]] += 1
    threads = [threading.Thread(target=reader) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        while seen[v1] < 5 and not errs:
            pass
        table.load_version(v2)
        while seen[v2] < 5 and not errs:
            pass
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errs, errs
    assert len(moves) == 3 and all(v == v2 for v, _ in moves)
    freed = [f for _, f in moves]
    # shard i moves after its own old version was released (shards release in order)
    assert all(f[i] for i, f in enumerate(freed))
    for s in table.shards:
        assert s._staged == {} and s.held_versions() == {"serving": [v2], "pending": [], "retiring": [],
                                                          "retired": [], "leased": []}
        assert s._serving.config.device == "cpu"
    assert torch.equal(table.fetch(ids), want[v2])


def test_unflipped_staged_version_is_dropped(tmp_path):
    root = str(tmp_path)
    cfg = TableConfig(d_k=8, d_v=4, segments=[("flat", 50)])
    t = Table.create(cfg, root)
    v1 = t.snapshot()
    v2 = t.snapshot()   # a shard never prepares the number it serves (store_service/labels.py)
    s = Shard.load(root, v1, 0)
    s.stage_swaps_on_host = True
    s.prepare_version(root, v2)
    assert len(s._staged) == 1
    s.release_version(v2)
    assert s._staged == {}
