"""Interpretability: which rows a prompt used, what a row is used for, what removing it costs.

    ctx = collect_row_contexts(model, tok, corpus.train_texts, m=8)    # one eval pass
    ctx.save(row_contexts_path(store_root, version))
    e = explain(model, tok, "The capital of France is", contexts=ctx)
    print(format_explanation(e))
    rows = answer_rows(model, tok, examples, per_fact=8)                 # rows each answer reads
    with ablated(model, table, torch.cat(rows)): ...                     # through the admin API

Per-row top contexts are kept cheaply: during one pass over texts, every read
(row, weight, document, position) is a candidate, and each row keeps only its
`m` heaviest documents (a top-m by readout weight, merged batch by batch with a
sort; no per-row Python). They are stored beside the table version they describe
(`<store_root>/row_contexts/v{version:08d}.pt`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from store_service.interface import UsageStats

from .data import ByteTokenizer, collate_examples
from .generate import generate
from .model import Transformer
from .reading import recording


# -- per-row top contexts ------------------------------------------------------------------

@dataclass
class RowContexts:
    """For each row, its m heaviest reads: document index, token position, weight."""
    doc: torch.Tensor       # [N, m] int64, -1 where empty
    pos: torch.Tensor       # [N, m] int64
    weight: torch.Tensor    # [N, m] float32, -inf where empty
    texts: list[str]        # the documents

    @classmethod
    def empty(cls, num_rows: int, m: int, texts: Sequence[str] = ()) -> "RowContexts":
        return cls(torch.full((num_rows, m), -1, dtype=torch.int64), torch.zeros(num_rows, m, dtype=torch.int64),
                   torch.full((num_rows, m), float("-inf")), list(texts))

    @property
    def m(self) -> int:
        return self.doc.shape[1]

    def update(self, rows: torch.Tensor, weights: torch.Tensor, docs: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge candidate reads (all [P]) into the per-row top-m, one entry per (row, document)."""
        N, m = self.doc.shape
        keep = (rows >= 0) & (rows < N)
        have = self.doc >= 0
        r = torch.cat([torch.arange(N).unsqueeze(1).expand(N, m)[have], rows[keep]])
        w = torch.cat([self.weight[have], weights[keep].float()])
        d = torch.cat([self.doc[have], docs[keep]])
        p = torch.cat([self.pos[have], pos[keep]])
        # sort by (row, doc, -weight): keep the heaviest read of each (row, doc)
        o = torch.argsort(-w, stable=True)
        o = o[torch.argsort(d[o], stable=True)]
        o = o[torch.argsort(r[o], stable=True)]
        r, w, d, p = r[o], w[o], d[o], p[o]
        first = torch.ones_like(r, dtype=torch.bool)
        first[1:] = (r[1:] != r[:-1]) | (d[1:] != d[:-1])
        r, w, d, p = r[first], w[first], d[first], p[first]
        # sort by (row, -weight) and keep the first m of each row
        o = torch.argsort(-w, stable=True)
        o = o[torch.argsort(r[o], stable=True)]
        r, w, d, p = r[o], w[o], d[o], p[o]
        start = torch.ones_like(r, dtype=torch.bool)
        start[1:] = r[1:] != r[:-1]
        group_start = torch.cummax(torch.where(start, torch.arange(r.numel()), torch.zeros_like(r)), 0).values
        rank = torch.arange(r.numel()) - group_start
        sel = rank < m
        self.doc.fill_(-1)
        self.weight.fill_(float("-inf"))
        self.pos.zero_()
        self.doc[r[sel], rank[sel]] = d[sel]
        self.pos[r[sel], rank[sel]] = p[sel]
        self.weight[r[sel], rank[sel]] = w[sel]

    def top(self, row: int, tok: ByteTokenizer, n: int | None = None, width: int = 40) -> list[dict]:
        """The row's heaviest contexts: {"weight", "text"}; the text ends with the token
        that read the row, in brackets, followed by the token it helped predict."""
        out = []
        for j in range(min(self.m, n or self.m)):
            d = int(self.doc[row, j])
            if d < 0:
                break
            ids = tok.encode(self.texts[d], bos=True, eos=True)
            p = int(self.pos[row, j])
            left = tok.decode(ids[max(0, p - width):p])
            here = tok.decode(ids[p:p + 1])
            nxt = tok.decode(ids[p + 1:p + 2])
            out.append({"weight": round(float(self.weight[row, j]), 4), "doc": d,
                        "text": f"{left}[{here}]->{nxt!r}"})
        return out

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"doc": self.doc, "pos": self.pos, "weight": self.weight, "texts": self.texts}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "RowContexts":
        d = torch.load(path, weights_only=False)
        return cls(d["doc"], d["pos"], d["weight"], d["texts"])


def row_contexts_path(store_root: str, version: int) -> str:
    return os.path.join(store_root, "row_contexts", f"v{version:08d}.pt")


@dataclass
class _Doc:
    prompt: str
    completion: str


@torch.no_grad()
def collect_row_contexts(model: Transformer, tok: ByteTokenizer, texts: Sequence[str], m: int = 8,
                         batch_size: int = 16, usage: bool = True) -> tuple[RowContexts, UsageStats | None]:
    """One pass over texts (fetch readout: the store's own usage counts are left
    alone). -> (per-row top-m contexts, the pass's own usage statistics)."""
    n_rows = model.tables()[0].info().num_rows
    ctx = RowContexts.empty(n_rows, m, texts)
    hits = torch.zeros(n_rows, dtype=torch.int64)
    wsum = torch.zeros(n_rows, dtype=torch.float64)
    with recording(model) as trace:
        for s in range(0, len(texts), batch_size):
            docs = [_Doc("", t) for t in texts[s:s + batch_size]]
            b = collate_examples(docs, tok, answer_only=False)
            model(b.inputs)
            valid = b.targets != -100                                       # [B, S] real tokens
            for read in trace.take().values():
                ids, w = read.ids, read.weights                              # [B, S, h, k]
                B, S, h, k = ids.shape
                ok = valid[:, :, None, None].expand_as(ids) & (ids >= 0)
                doc = (torch.arange(B) + s)[:, None, None, None].expand_as(ids)
                pos = torch.arange(S)[None, :, None, None].expand_as(ids)
                ctx.update(ids[ok], w[ok], doc[ok], pos[ok])
                read = ok & (w > 0)
                hits.index_add_(0, ids[read], torch.ones_like(ids[read]))
                wsum.index_add_(0, ids[ok], w[ok].double())
    tab = model.tables()[0].usage()
    return ctx, (UsageStats(hits, wsum, tab.frozen, tab.ablated) if usage else None)


# -- explain -------------------------------------------------------------------------------

@torch.no_grad()
def explain(model: Transformer, tok: ByteTokenizer, prompt: str, *, contexts: RowContexts | None = None,
            max_new_tokens: int = 16, top_rows: int = 4, top_contexts: int = 3,
            labels: dict[int, str] | None = None) -> dict:
    """For each knowledge layer and token (prompt and generated answer): the rows read,
    their weights (summed over heads, as a share of the token's readout weight) and,
    with `contexts`, the contexts that use each row most. Tables with gated rows: also
    the gates open at each token (a detector label with its evidence), named by `labels`
    (label -> what it stands for, as `learn` reports it)."""
    ids = tok.encode(prompt, bos=True)
    gen = generate(model, torch.tensor([ids]), max_new_tokens, eos_id=tok.eos_id, record=True)
    out_ids = gen.tokens[0].tolist()
    if tok.eos_id in out_ids:
        out_ids = out_ids[:out_ids.index(tok.eos_id)]
    seq = ids + out_ids
    result = {"prompt": prompt, "answer": tok.decode(out_ids), "layers": {}}
    for layer, (rids, w) in gen.rows.items():
        h = rids.shape[2]
        tokens = []
        for t in range(min(rids.shape[1], len(seq))):
            r, ww = rids[0, t].reshape(-1), w[0, t].reshape(-1)
            keep = r >= 0
            uniq, inv = torch.unique(r[keep], return_inverse=True)
            tot = torch.zeros(uniq.numel()).index_add_(0, inv, ww[keep]) / h
            order = tot.argsort(descending=True)[:top_rows]
            rows = []
            for j in order.tolist():
                row = {"id": int(uniq[j]), "weight": round(float(tot[j]), 4)}
                if contexts is not None and int(uniq[j]) < contexts.doc.shape[0]:
                    row["contexts"] = contexts.top(int(uniq[j]), tok, top_contexts)
                rows.append(row)
            tokens.append({"pos": t, "token": tok.decode(seq[t:t + 1]), "generated": t >= len(ids) - 1,
                           "rows": rows})
        for t, open_gates in enumerate(_open_gates(gen.gates.get(layer, []), labels or {})[:len(tokens)]):
            tokens[t]["gates"] = open_gates
        result["layers"][layer] = tokens
    return result


def _open_gates(records: Sequence, labels: dict[int, str]) -> list[list[dict]]:
    """Per position of sequence 0 (the calls' positions one after another): the open labels."""
    out = []
    for rec in records:
        for opened, ev in zip(rec.opened[0], rec.evidence[0]):              # [G] per position
            out.append([{"label": int(lab), **({"name": labels[int(lab)]} if int(lab) in labels else {}),
                         **({"evidence": round(float(e), 3)} if torch.isfinite(e) else {})}
                        for lab, e in zip(rec.labels[opened].tolist(), ev[opened])])
    return out


def format_explanation(e: dict, only_answer: bool = False) -> str:
    lines = [f"{e['prompt']}{e['answer']}"]
    for layer, tokens in e["layers"].items():
        lines.append(f"knowledge layer {layer}:")
        for t in tokens:
            if only_answer and not t["generated"]:
                continue
            rows = "  ".join(f"{r['id']}:{r['weight']:.2f}" for r in t["rows"])
            lines.append(f"  {t['pos']:3d} {t['token']!r:>6}{' *' if t['generated'] else '  '} rows {rows}")
            if t.get("gates"):
                lines.append("        open: " + "; ".join(
                    g.get("name", f"label {g['label']}") + (f" (evidence {g['evidence']:+.2f})" if "evidence" in g else "")
                    for g in t["gates"]))
            for r in t["rows"][:1]:
                for c in r.get("contexts", [])[:2]:
                    lines.append(f"        row {r['id']} also used in: {c['text']}")
    return "\n".join(lines)


# -- ablation ------------------------------------------------------------------------------

@torch.no_grad()
def answer_rows(model: Transformer, tok: ByteTokenizer, examples: Sequence, per_fact: int = 8,
                batch_size: int = 32, background: torch.Tensor | None = None) -> list[torch.Tensor]:
    """For each example (prompt + completion), the `per_fact` rows with the largest total
    readout weight over the positions that predict its answer (teacher forced).
    background [N]: per-row readout weight on general text; rows are then ranked by
    TF-IDF, weight * log(total / background), so rows every text reads rank low."""
    out: list[torch.Tensor] = []
    with recording(model) as trace:
        n_rows = model.tables()[0].info().num_rows
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s:s + batch_size])
            b = collate_examples(chunk, tok, answer_only=True)
            model(b.inputs)
            scored = b.targets != -100
            tot = torch.zeros(len(chunk), n_rows)
            for read in trace.take().values():
                ids, w = read.ids, read.weights                              # [B, S, h, k]
                ok = scored[:, :, None, None].expand_as(ids) & (ids >= 0)
                bi = torch.arange(len(chunk))[:, None, None, None].expand_as(ids)
                tot.index_put_((bi[ok], ids[ok]), w[ok].float(), accumulate=True)
            if background is not None:
                bg = background.double()
                tot = tot * torch.log((bg.sum() + 1) / (bg + 1)).float().clamp_min(0)
            top = tot.topk(per_fact, dim=1)
            for i in range(len(chunk)):
                out.append(top.indices[i][top.values[i] > 0])
    return out


def set_ablated(model: Transformer, ids: torch.Tensor, on: bool = True) -> None:
    """Ablate (or restore) rows through the table's admin API, then let the layers see it."""
    ids = torch.unique(ids.to(torch.int64))
    if ids.numel() == 0:
        return
    for t in model.tables():
        t.set_ablated(ids, on)
    model.refresh_table_state()


@contextlib.contextmanager
def ablated(model: Transformer, ids: torch.Tensor):
    """Rows `ids` ablated inside the block (those already ablated stay so after)."""
    ids = torch.unique(ids.to(torch.int64))
    before = model.tables()[0].usage().ablated
    fresh = ids[~before[ids]] if ids.numel() else ids
    set_ablated(model, fresh, True)
    try:
        yield fresh
    finally:
        set_ablated(model, fresh, False)
