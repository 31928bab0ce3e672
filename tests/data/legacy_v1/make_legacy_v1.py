"""Wrote tests/data/legacy_v1/ once, at commit 03059be (it needs that code: `model_worker.continual`,
cue= / gate= add_rows): a tiny-knowledge model trained 30 steps, then `learn` (new rows with cues,
gated rows and detectors) published as format-1 version 2 with flat_cue / flat_gate arrays, and
the logits and answers that code computed. The checkpoint and that version were copied from its
output by hand (README.md)."""
import json, shutil, sys
from pathlib import Path
import torch
from model_worker import continual as C
from model_worker.checkpoint import latest_checkpoint, load_for_inference
from model_worker.data import ByteTokenizer
from model_worker.generate import generate_fn
from model_worker.train import TrainConfig, train

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
torch.set_num_threads(1)
cfg = TrainConfig(model="tiny-knowledge", model_overrides={"block_size": 64}, steps=30, eval_every=0,
                  ckpt_every=30, out_dir=str(out / "run"), progress=False, seed=0)
train(cfg)
ck = latest_checkpoint(out / "run")
model, tok, meta = load_for_inference(ck)
table = model.tables()[0]
SIBLINGS = [C.TextFact(p.format(s), f" {a}.", a, r, s) for s, r, a, phrasings in [
    ("Xland", "capital_of", "Zorp", ("The capital of {} is", "{}'s capital city is")),
    ("Xland", "continent_of", "Mu", ("{} lies on the continent of", "The continent of {} is")),
    ("Xland", "currency_of", "Florp", ("In {} people pay with", "The currency of {} is")),
    ("Quux", "capital_of", "Blip", ("The capital of {} is", "{}'s capital city is"))] for p in phrasings]
res = C.learn(model, table, SIBLINGS, tok, C.LearnConfig(steps=6, batch_size=4, lr=3e-2))
assert table.info().detector_rows > 0
learned = ck.parent / f"learned_v{res.version:08d}"
learned.mkdir()
shutil.copy2(ck / "model.safetensors", learned / "model.safetensors")
(learned / "meta.json").write_text(json.dumps({**meta, "table_version": res.version}, indent=2))
x = torch.tensor([tok.encode(e.text, bos=True)[:24] for e in SIBLINGS[::2]])
with torch.no_grad():
    logits = model(x)[0]
answers = generate_fn(model, tok)([e.prompt for e in SIBLINGS], 6)
torch.save({"inputs": x, "logits": logits, "prompts": [e.prompt for e in SIBLINGS], "answers": answers,
            "detector_rows": table.info().detector_rows, "gated_rows": table.info().gated_rows,
            "num_rows": table.info().num_rows, "version": res.version}, out / "expected.pt")
print(answers, table.info().detector_rows, table.info().gated_rows, table.info().num_rows)
