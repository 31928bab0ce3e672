"""A reader on a bulk path while the shard swaps versions sees one version, never a torn buffer.

The shard serves v1, v2 = v1 + 1000, v3 = v1 + 2000 in turn (prepare, flip, release, as fast
as it can) while reader threads fetch every row through a small staging buffer, so each read
is many pieces with swaps landing between them. Every answer must equal one version's rows
exactly; a mix of versions matches none."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from store_service import persistence
from store_service.config import TableConfig
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table
from store_service.transport.client import BulkPath
from store_service.transport.config import ClientConfig

TOKEN = "transport-swap"


def _publish_shifted(root: str, src: int, dst: int, shift: float) -> None:
    with persistence.staged_version(root, dst) as stage:
        data = persistence.read_shard(persistence.version_path(root, src), 0)
        arrays = dict(data.arrays, values=data.arrays["values"] + shift)
        persistence.write_shard(stage, persistence.ShardData(dict(data.attrs, version=dst), arrays))
        persistence.finish_version(stage, dst)


@pytest.mark.parametrize("kind", ["shm", "torch_dist"])
def test_reads_during_swaps_see_one_version(tmp_path, kind):
    root = str(tmp_path)
    v1 = Table.create(TableConfig(d_k=8, d_v=32, segments=[("flat", 2000)], seed=9), root).snapshot()
    _publish_shifted(root, v1, v1 + 1, 1000.0)
    _publish_shifted(root, v1, v1 + 2, 2000.0)
    ids = torch.arange(2000)
    want = {v: Shard.load(root, v, 0).fetch(ids) for v in (v1, v1 + 1, v1 + 2)}
    shard = Shard.load(root, v1, 0)
    server = serve_shard(shard, admin_token=TOKEN, max_workers=16)
    # 8 KiB slots hold 64 rows: a read of 2000 rows is 32 pieces.
    cfg = ClientConfig(buffer_bytes=4 * 8192, slots=4, timeout_s=30, retries=50)
    paths = [BulkPath.open(server.address, TOKEN, kind, cfg) for _ in range(2)]
    stop, flips, seen, failures = threading.Event(), [0], [], []

    def swap():
        serving = v1
        while not stop.is_set():
            nxt = v1 + (serving - v1 + 1) % 3
            shard.prepare_version(root, nxt)
            shard.flip_version(nxt)
            shard.release_version(serving)
            serving = nxt
            flips[0] += 1

    def read(path):
        try:
            while not stop.is_set():
                got = path.fetch(ids)
                match = [v for v, rows in want.items() if torch.equal(got, rows)]
                seen.append(match[0] if len(match) == 1 else None)
        except Exception as exc:   # any failure is reported below
            failures.append(exc)

    threads = [threading.Thread(target=swap)] + [threading.Thread(target=read, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    # Until enough reads overlapped enough swaps (a loaded machine needs longer), at most 30 s.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not failures and not (
            flips[0] >= 10 and len(seen) >= 10 and len(set(seen)) >= 2):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(30)
    for p in paths:
        p.close()
    server.stop(grace=None)
    assert not failures, failures
    assert None not in seen, "a read mixed versions"
    assert flips[0] >= 10 and len(seen) >= 10 and len(set(seen)) >= 2, (flips[0], len(seen), set(seen))
