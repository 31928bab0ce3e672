"""What learning did: new- and old-fact recall, forgetting, and how the new rows are read.
Every measure reads rows by fetch, so measuring leaves the store's usage counts alone."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import evaluate
from ..data import Batch, ByteTokenizer, collate_examples, packed_batches
from ..generate import generate_fn
from ..model import Transformer
from ..reading import recording
from .queries import subject_positions


@torch.no_grad()
def measure(model: Transformer, tok: ByteTokenizer, *, new_eval: Sequence, old_eval: Sequence,
            heldout_texts: Sequence[str], old_seen: Sequence = (), new_seen: Sequence = (),
            loss_batches: int = 8, seq_len: int = 64,
            batch_size: int = 16) -> dict:
    """New-fact recall, old-fact recall (held-out phrasings; `old_seen`: also on a
    trained phrasing; `new_seen`: new facts on a phrasing they were taught with) and held-out loss."""
    model.eval()
    with model.reading(readout="fetch"):
        gen = generate_fn(model, tok)
        new = evaluate.recall_on_examples(gen, list(new_eval)) if new_eval else {"recall": float("nan")}
        old = evaluate.recall_on_examples(gen, list(old_eval)) if old_eval else {"recall": float("nan")}
        seen = evaluate.recall_on_examples(gen, list(old_seen)) if old_seen else {"recall": float("nan")}
        nseen = evaluate.recall_on_examples(gen, list(new_seen)) if new_seen else {"recall": float("nan")}
        batches = packed_batches(list(heldout_texts), tok, seq_len, batch_size)[:loss_batches]
        loss = evaluate.heldout_loss(lambda b: model(b.inputs, b.targets)[1], batches)["loss"]
    return {"new_recall": new["recall"], "old_recall": old["recall"], "heldout_loss": loss,
            "new_correct": new.get("correct"), "old_correct": old.get("correct"),
            "old_seen_recall": seen["recall"], "old_seen_correct": seen.get("correct"),
            "new_seen_recall": nseen["recall"], "new_seen_correct": nseen.get("correct")}


def forgetting(before: dict, after: dict) -> dict:
    """Relative drop of old-fact recall, and rise of held-out loss."""
    def drop(key):
        b = before.get(key, float("nan"))
        return (b - after[key]) / b if b > 0 else float("nan")
    return {"recall_drop": drop("old_recall"), "seen_recall_drop": drop("old_seen_recall"),
            "loss_rise": (after["heldout_loss"] - before["heldout_loss"]) / before["heldout_loss"]}


@torch.no_grad()
def new_row_interference(model: Transformer, batches: Sequence[Batch], first_new_id: int) -> float:
    """Share of (token, head) reads on `batches` that select at least one row with
    id >= first_new_id: how often new rows reach into old contexts."""
    hit = total = 0
    with recording(model) as trace:
        for b in batches:
            model(b.inputs)
            for read in trace.take().values():
                sel = (read.ids >= first_new_id).any(-1)      # [B, S, h]
                hit += int(sel.sum())
                total += sel.numel()
    return hit / max(1, total)


@torch.no_grad()
def new_row_reads(model: Transformer, tok: ByteTokenizer, examples: Sequence, first_new_id: int) -> dict:
    """Do the new rows carry the answers? Teacher-forced on `examples`, at their answer
    positions: share of positions (and of the positions that predict the answer's first
    character, where the fact is decided) at which some head selects a new row, the
    readout weight new rows get there, and next-token accuracy with the new rows and
    with them ablated. Also the share of subject positions that read a new row."""
    table = model.tables()[0]
    b = collate_examples(list(examples), tok, True)
    scored = b.targets != -100
    first_char = scored & ((scored.cumsum(1) - 1) == 1)          # target 0 is the space before the answer
    _, _, at = subject_positions(list(examples), tok, 1 << 30, len(examples))
    subj = at[0][0]
    with model.reading(readout="fetch", record=True) as trace:
        logits = model(b.inputs)[0]
    reads = list(trace.take().values())
    sel = torch.stack([(r.ids >= first_new_id).any(-1) for r in reads]).any(0)     # [B, S, h]
    wnew = torch.stack([(r.weights * (r.ids >= first_new_id)).sum(-1) for r in reads]).mean(0)
    new_ids = torch.arange(first_new_id, table.info().num_rows)
    table.set_ablated(new_ids, True)
    model.refresh_table_state()
    try:
        with model.reading(readout="fetch"):
            logits0 = model(b.inputs)[0]
    finally:
        table.set_ablated(new_ids, False)
        model.refresh_table_state()
    ok, ok0 = logits.argmax(-1) == b.targets, logits0.argmax(-1) == b.targets
    return {"answer_positions": int(scored.sum()),
            "answer_positions_reading_new": float(sel.any(-1)[scored].float().mean()),
            "first_char_positions_reading_new": float(sel.any(-1)[first_char].float().mean()),
            "new_weight_where_read": float(wnew[sel & scored[..., None]].mean()) if bool((sel & scored[..., None]).any()) else 0.0,
            "subject_positions_reading_new": float(sel.any(-1)[subj].float().mean()) if bool(subj.any()) else 0.0,
            "token_acc": float(ok[scored].float().mean()), "token_acc_new_rows_ablated": float(ok0[scored].float().mean()),
            "first_char_acc": float(ok[first_char].float().mean()),
            "first_char_acc_new_rows_ablated": float(ok0[first_char].float().mean())}
