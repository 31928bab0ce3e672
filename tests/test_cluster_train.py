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
        pending = worker.train.remote(dataclasses.asdict(cfg), store_root)
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
