"""Whole-table hot swap through StoreAdmin while clients hammer search and readout.

Three shard servers run as processes (`python -m store_service.serve`) on v1.
v2 is v1 with every value + 1000 and every key (flat keys and both product
codebooks) negated, so an answer reveals its version: a search returns other
rows, a readout is shifted by 1000 * sum(w). Any mix of shards from two
versions matches neither expected answer. During the swap (prepare all, flip
all, release old, via the admin API) no call may fail, and every answer must
be wholly v1's or wholly v2's.
"""
from __future__ import annotations

import threading
import time

import torch

from store_service import persistence
from store_service.client import connect
from store_service.config import TableConfig
from store_service.serve import start_shard_process
from store_service.table import Table

TOKEN = "swap-token"
SHIFT = 1000.0


def _publish_shifted(root: str, src: int, dst: int) -> None:
    """Publish version dst = version src with values + SHIFT and keys negated."""
    shard_ids = [s["shard_id"] for s in persistence.read_root_attrs(root, src)["shards"]]
    with persistence.staged_version(root, dst) as stage:
        for sid in shard_ids:
            data = persistence.read_shard(persistence.version_path(root, src), sid)
            arrays = dict(data.arrays)
            arrays["values"] = arrays["values"] + SHIFT
            for name in arrays:
                if name == "keys" or name.endswith(("_codebook_a", "_codebook_b")):
                    arrays[name] = -arrays[name]
            persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=dst), arrays))
        persistence.finish_version(stage, dst)


def test_hot_swap_under_load_never_fails_and_never_mixes_versions(tmp_path):
    root = str(tmp_path)
    cfg = TableConfig(d_k=16, d_v=24, segments=[("product", 16), ("flat", 120)], store_codebooks=True,
                      num_shards=3, bias_step=0.0, seed=5)
    v1 = Table.create(cfg, root).snapshot()
    v2 = v1 + 1
    _publish_shifted(root, v1, v2)

    # What each version must answer, from in-process tables.
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(8, 4, cfg.d_k, generator=gen)                    # 8 batches of 4 queries
    ids = torch.randint(0, cfg.num_rows, (8, 6, 5), generator=gen)         # 8 batches of 6 tokens, k=5
    ids[:, 0] = torch.tensor([0, 100, 200, 300, 370])                      # every batch spans all shards
    weights = torch.softmax(torch.randn(8, 6, 5, generator=gen), -1)
    expected = {}
    for v in (v1, v2):
        t = Table.open(root, v)
        expected[v] = ([t.search(q, 7, want_keys=True) for q in queries],
                       [t.readout(i, w) for i, w in zip(ids, weights)])
    assert not torch.equal(expected[v1][0][0].ids, expected[v2][0][0].ids)

    procs = [start_shard_process(root, v1, i, admin_token=TOKEN, extra_args=["--torch-threads", "1"])
             for i in range(3)]
    addresses = [p.address for p in procs]
    seen = {v1: 0, v2: 0}
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def version_of_search(b: int, res) -> int | None:
        for v in (v1, v2):
            e = expected[v][0][b]
            if torch.equal(res.ids, e.ids) and torch.allclose(res.scores, e.scores, atol=1e-5) \
                    and torch.allclose(res.keys, e.keys, atol=1e-6):
                return v
        return None

    def version_of_readout(b: int, out) -> int | None:
        for v in (v1, v2):
            if torch.allclose(out, expected[v][1][b], atol=1e-3):
                return v
        return None

    def hammer(table: Table, worker: int) -> None:
        b = worker
        while not stop.is_set():
            b = (b + 1) % len(queries)
            try:
                if b % 2:
                    v = version_of_search(b, table.search(queries[b], 7, want_keys=True))
                else:
                    v = version_of_readout(b, table.readout(ids[b], weights[b]))
            except Exception as exc:  # any failed call fails the test
                with lock:
                    failures.append(f"worker {worker}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                if v is None:
                    failures.append(f"worker {worker}: batch {b} answer matches neither version (mixed)")
                else:
                    seen[v] += 1

    clients = [connect(addresses, token=TOKEN, timeout_s=30) for _ in range(2)]
    threads = [threading.Thread(target=hammer, args=(clients[w % 2], w)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        admin = connect(addresses, admin_token=TOKEN, store_root=root, timeout_s=60)
        assert admin.info().version == v1
        with lock:
            before = seen[v1]
        admin.load_version(v2)  # prepare all, flip all, release v1 (drains its in-flight calls)
        assert all(s.describe().info.version == v2 for s in admin.shards)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # let every worker get answers from v2
            with lock:
                if seen[v2] >= 20:
                    break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for p in procs:
            p.stop()
    print("answers by version", seen)
    assert not failures, failures[:5]
    assert before > 0 and seen[v1] >= before and seen[v2] >= 20, seen
