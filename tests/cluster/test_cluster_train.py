"""Training on the cluster: a worker actor trains against shard actors; a shard
killed mid-run is restarted by Ray, and the run resumes from its last
consistent checkpoint. Its final state equals an uninterrupted run resumed
from the same checkpoint (here: in-process, against the published version)."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.config import ClusterConfig  # noqa: E402
from cluster.launch import StoreCluster  # noqa: E402
from cluster.worker_actor import WorkerActor  # noqa: E402
from model_worker.checkpoint import read_meta, step_dir  # noqa: E402
from model_worker.train import TrainConfig, model_config, table_config, train  # noqa: E402
from store_service.table import Table  # noqa: E402


@pytest.mark.slow
def test_training_survives_a_killed_shard(tmp_path):
    cfg = TrainConfig(model="tiny-knowledge", corpus="tiny", steps=60, seq_len=64, batch_size=8,
                      ckpt_every=10, eval_every=0, progress=False, out_dir=str(tmp_path / "run"), num_shards=2)
    store_root = str(tmp_path / "store")
    cluster = StoreCluster.start(ClusterConfig(store_root=store_root, num_shards=2),
                                 table_config(model_config(cfg, 260), cfg))
    try:
        worker = WorkerActor.remote(cluster.config.admin_token)
        pending = worker.train.remote(dataclasses.asdict(cfg), cluster.config.to_dict())
        latest = Path(cfg.out_dir) / "latest"
        deadline = time.monotonic() + 300
        while not latest.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert latest.exists(), "no checkpoint was written"
        cluster.kill_shard(0)
        result = ray.get(pending, timeout=600)
    finally:
        cluster.stop()
        ray.shutdown()

    assert result["recoveries"] == 1
    start = result["start_step"]
    assert 10 <= start < 60 and start % 10 == 0
    # The reference: resume the same checkpoint without any failure, in-process.
    ckpt = tmp_path / "ref_ckpt"
    shutil.copytree(step_dir(cfg.out_dir, start), ckpt)
    table = Table.open(store_root, read_meta(ckpt)["table_version"])
    ref = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref"), ckpt_every=0), table=table, resume=ckpt)
    assert ref["start_step"] == start
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


def _tiny(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(model="tiny-knowledge", corpus="tiny", steps=24, seq_len=64, batch_size=8, eval_every=0,
                progress=False, out_dir=str(tmp_path / name), num_shards=2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_training_across_scaling_matches_in_process(tmp_path):
    """Scale 2 -> 3 -> 1 shards between steps of a run: no failed call, and the
    losses equal those of the same run on an in-process table."""
    cfg = _tiny(tmp_path, "scaled")
    cluster = StoreCluster.start(ClusterConfig(store_root=str(tmp_path / "store"), num_shards=2),
                                 table_config(model_config(cfg, 260), cfg))
    try:
        worker = WorkerActor.remote(cluster.config.admin_token)
        result = ray.get(worker.train.remote(dataclasses.asdict(cfg), cluster.config.to_dict(),
                                             scale_at={8: 3, 16: 1}), timeout=600)
        assert cluster.shard_map().num_shards == 1
        # then hot-swap the store while the worker generates: no failed call
        table = cluster.table()
        version = table.snapshot()
        table.close()
        questions = ["The capital of France is", "Paris is the capital of"]
        calls = [worker.answer.remote(questions, 8) for _ in range(6)]
        cluster.swap(version)
        calls += [worker.answer.remote(questions, 8) for _ in range(2)]
        answers = ray.get(calls, timeout=300)  # raises if any call failed
        assert len(answers) == 8 and answers[-1] == answers[0]
    finally:
        cluster.stop()
        ray.shutdown()
    assert result["num_shards"] == 1 and result["table_step"] == 24
    ref = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")))
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_two_data_parallel_workers_share_one_store(tmp_path):
    """Two worker actors train data-parallel (gloo) against one store: the store
    applies each step once (its step equals the run's), and the replicas stay
    identical, balancing biases included."""
    cfg = _tiny(tmp_path, "dp", steps=12)
    cluster = StoreCluster.start(ClusterConfig(store_root=str(tmp_path / "store"), num_shards=2),
                                 table_config(model_config(cfg, 260), cfg))
    try:
        workers = [WorkerActor.remote(cluster.config.admin_token) for _ in range(2)]
        addr, port = ray.get(workers[0].free_port.remote())
        runs = ray.get([w.train.remote(dataclasses.asdict(cfg), cluster.config.to_dict(),
                                       data_parallel=(r, 2, addr, port), return_state=True)
                        for r, w in enumerate(workers)], timeout=600)
    finally:
        cluster.stop()
        ray.shutdown()
    assert [r["table_step"] for r in runs] == [12, 12]
    a, b = (r["model_state"] for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert runs[0]["losses"] != runs[1]["losses"]  # each rank saw its own batches
