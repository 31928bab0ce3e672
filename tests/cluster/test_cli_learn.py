"""`kstore learn --facts`, end to end on a tiny trained checkpoint: it publishes a new
store version with rows gated on their subject's links (and detectors for a subject with
two facts), writes a checkpoint whose weights are a bitwise copy of the input's, and that
checkpoint loads and answers."""
from __future__ import annotations

import json

import torch

from cluster.cli import build_parser
from model_worker.checkpoint import latest_checkpoint, load_for_inference
from model_worker.gating import DETECTOR_PARTITION, GATE_TAG
from model_worker.generate import answer
from model_worker.train import TrainConfig, train


def test_learn_from_a_facts_file(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(model="tiny-knowledge", corpus="tiny", steps=4, batch_size=4, eval_every=0, ckpt_every=4,
                      progress=False, out_dir=str(run)))
    ckpt = latest_checkpoint(run)
    facts = tmp_path / "facts.txt"
    facts.write_text("The capital of Xland is\tZorp\tXland\nXland lies on the continent of\tMu\tXland\n"
                     "The capital of Quux is\tBlip\tQuux\n")
    out = tmp_path / "learned"
    args = build_parser().parse_args(["learn", "--checkpoint", str(ckpt), "--facts", str(facts), "--steps", "3",
                                      "--batch-size", "3", "--background-batches", "2", "--out", str(out)])
    args.fn(args)
    report = json.loads(capsys.readouterr().out)
    assert report["facts"] == 3 and report["new_rows"] > 0 and report["published_version"] is not None
    assert report["link_rows"] > 0 and report["gated_rows"] > 0 and not report["model_weights_changed"]
    assert report["detector_rows"] > 0                  # Xland has two facts: detectors tell them apart
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()

    model, tok, meta = load_for_inference(str(out))
    table = model.tables()[0]
    assert table.info().version == report["published_version"]
    assert table.info().tag_rows[GATE_TAG] == report["gated_rows"]
    assert table.info().partition_rows[DETECTOR_PARTITION] == report["detector_rows"] + report["link_rows"]
    texts = answer(model, tok, ["The capital of Xland is", "The capital of France is"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with torch.no_grad():                         # the gated table also serves a full forward
        model(torch.tensor([tok.encode("The capital of Xland is Zorp.", bos=True)]))
