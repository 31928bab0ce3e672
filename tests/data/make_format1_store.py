"""Write tests/data/format1_store: a small table version as the pre-restructure store wrote it
(commit 03059be: format 1, row labels as flat_cue / flat_gate, no partitions), and the answers
that code gave to a few searches on it (format1_answers.pt), for tests/store/test_persistence.py.

It must run against that code, not this tree's:

    git -C /work/wt/store archive 03059be | tar -x -C /tmp/old
    cd /tmp/old && python /path/to/tests/data/make_format1_store.py /path/to/tests/data
"""
from __future__ import annotations

import os
import shutil
import sys

import torch

from store_service.config import OptimizerConfig, TableConfig
from store_service.table import Table


def main(out_dir: str) -> None:
    root = os.path.join(out_dir, "format1_store")
    shutil.rmtree(root, ignore_errors=True)
    cfg = TableConfig(d_k=8, d_v=4, segments=[("product", 4), ("flat", 12)], store_codebooks=True,
                      num_shards=2, seed=7, bias_step=0.05, optimizer=OptimizerConfig("adam", lr=0.01))
    table = Table.create(cfg, root)
    g = torch.Generator().manual_seed(0)
    # 10 labelled rows: 2 cues (labels 50, 51), 3 gated (gates 50, 50, 51), 5 with both (evidence
    # for labels 60 / 61 under gate 50, 62 under gate 51), and 2 plain rows.
    cue = torch.tensor([50, 51, -1, -1, -1, 60, 60, 61, 61, 62, -1, -1])
    gate = torch.tensor([-1, -1, 50, 50, 51, 50, 50, 50, 50, 51, -1, -1])
    keys = torch.randn(12, 8, generator=g) * 2
    bias = torch.linspace(-0.3, 0.3, 12)
    ids = table.add_rows(torch.randn(12, 4, generator=g), keys, bias, cue=cue, gate=gate)
    # One training step with reads, so balancing and Adam state are part of the version.
    sel = torch.tensor([[0, 17, 30, -1], [3, 16, 29, 20]])
    w = torch.rand(2, 4, generator=g)
    table.readout(sel, w)
    table.readout_backward(sel, w, torch.randn(2, 4, generator=g))
    table.accumulate_key_grads(torch.tensor([16, 18]), torch.randn(2, 8, generator=g))
    table.end_step(0)
    table.set_frozen(torch.tensor([1, 19]))
    table.set_ablated(torch.tensor([2, 25]))
    version = table.snapshot()
    q = torch.cat([keys[:6], torch.randn(4, 8, generator=g)])
    res = table.search(q, 6, detectors=4)
    d = res.detectors
    torch.save({"version": version, "queries": q, "k": 6, "m": 4, "ids": res.ids, "scores": res.scores,
                "keys": res.keys, "cue": res.cue, "gate": res.gate, "side_ids": d.ids, "side_scores": d.scores,
                "side_cue": d.cue, "side_gate": d.gate, "added_ids": ids, "fetch": table.fetch(torch.arange(40))},
               os.path.join(out_dir, "format1_answers.pt"))
    shutil.rmtree(os.path.join(root, "staging"), ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
