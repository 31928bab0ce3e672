"""Generation with the KV cache (and the gate states, gating.py): greedy or top-p
sampling, rows retrieved per generated token (fetch readout by default: small
batches), and a record of the rows each token read in every knowledge layer.

    gen = generate(model, prompt_ids, max_new_tokens=16, eos_id=tok.eos_id, record=True)
    gen.tokens                      # [B, N] generated ids (eos_id after a row stopped)
    gen.rows[layer]                 # (ids [B, P+N-1, h, k], weights [B, P+N-1, h, k])
    gen.gates[layer]                # the gates each call opened (tables with gated rows)
    answer(model, tok, ["The capital of France is"])   -> [" Paris."]
    fact_recall(generate_fn(model, tok), corpus.eval_prompts, corpus.eval_answers)

Command line (answers questions from a checkpoint; see train.py for checkpoints):

    python -m model_worker.generate --checkpoint runs/x/step_000200 "The capital of France is"
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from .checkpoint import load_for_inference
from .model import Transformer


@dataclass
class Generation:
    tokens: torch.Tensor                                    # [B, N]
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (ids, weights)
    # layer -> one GateRecord per model call (the prompt, then each new token), for tables with gated rows
    gates: dict[int, list] = field(default_factory=dict)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 = greedy; else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p          # the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, eos_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
             record: bool = False, readout: str | None = "fetch") -> Generation:
    """prompt: [B, P] token ids (rows of equal length). Prefill once, then decode one
    token at a time from the KV cache; each token retrieves its own rows."""
    B, P = prompt.shape
    max_new_tokens = min(max_new_tokens, model.cfg.block_size - P)
    was_training = model.training
    model.eval()
    out = torch.full((B, max(max_new_tokens, 0)), eos_id if eos_id is not None else 0, dtype=torch.long,
                     device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    try:
        with model.reading(readout=readout, record=record) as trace:
            model.setup_caches(B, P + max_new_tokens)
            logits, _ = model(prompt, input_pos=torch.arange(P, device=prompt.device))   # [B, P, V]
            for t in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], temperature, top_p, generator)
                if eos_id is not None:
                    nxt = nxt.masked_fill(done, eos_id)
                    done |= nxt == eos_id
                out[:, t] = nxt
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                logits, _ = model(nxt[:, None], input_pos=torch.tensor([P + t], device=prompt.device))
    finally:
        model.clear_caches()
        model.train(was_training)
    if trace is None or max_new_tokens <= 0:
        return Generation(out)
    layers = trace.layers()
    return Generation(out, {i: trace.rows(i) for i in layers},
                      {i: g for i in layers if (g := trace.gates(i))})


def answer(model: Transformer, tokenizer, questions: list[str], max_new_tokens: int = 32, **kw) -> list[str]:
    """Greedy (by default) continuations of each question, up to EOS or a newline.
    Prompts of equal token length are batched together (no padding needed)."""
    encoded = [tokenizer.encode(q, bos=True)[-(model.cfg.block_size - 1):] for q in questions]
    answers: list[str] = [""] * len(questions)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    device = model.output.weight.device
    for idxs in by_len.values():
        prompt = torch.tensor([encoded[i] for i in idxs], dtype=torch.long, device=device)
        gen = generate(model, prompt, max_new_tokens, eos_id=tokenizer.eos_id, **kw)
        for row, i in enumerate(idxs):
            ids = gen.tokens[row].tolist()
            if tokenizer.eos_id in ids:
                ids = ids[: ids.index(tokenizer.eos_id)]
            answers[i] = tokenizer.decode(ids)
    return answers


def generate_fn(model: Transformer, tokenizer, **kw):
    """A `generate_fn(prompts, max_new_tokens) -> texts` for evaluate.fact_recall."""
    def fn(prompts: list[str], max_new_tokens: int) -> list[str]:
        return answer(model, tokenizer, list(prompts), max_new_tokens, **kw)
    return fn


def run(args: argparse.Namespace, table=None) -> None:
    """Answer args.questions from args.checkpoint; `table`: read rows from it instead of
    the checkpoint's own store version (a standing cluster's serving table)."""
    from pathlib import Path

    from .checkpoint import latest_checkpoint
    ckpt = Path(args.checkpoint)
    if not (ckpt / "meta.json").exists():
        found = latest_checkpoint(ckpt) if ckpt.is_dir() else None
        if found is None:
            raise FileNotFoundError(f"{ckpt} is neither a checkpoint (a step directory with meta.json) nor a "
                                    "run directory holding one; train first (python -m model_worker.train)")
        ckpt = found
    model, tokenizer, _ = load_for_inference(ckpt, table=table)
    kw = dict(temperature=args.temperature, top_p=args.top_p)
    for q, a in zip(args.questions, answer(model, tokenizer, args.questions, args.max_new_tokens, **kw)):
        print(f"{q}{a}")
        if args.show_rows:
            prompt = torch.tensor([tokenizer.encode(q, bos=True)])
            gen = generate(model, prompt, 1, record=True)
            for layer, (ids, w) in gen.rows.items():
                top = w[0, -1].flatten().topk(min(5, w[0, -1].numel()))
                print(f"  layer {layer}: rows {ids[0, -1].flatten()[top.indices].tolist()} "
                      f"weights {[round(x, 3) for x in top.values.tolist()]}")


def main(argv: list[str] | None = None) -> None:
    from .cli_flags import add_generate_arguments
    ap = argparse.ArgumentParser(description="Answer questions from a trained checkpoint.")
    add_generate_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
