"""Research probes of the continual benchmark: can anything in the knowledge layer's
query tell a new fact's unseen phrasing from old text? (What they found:
CONTINUAL_NOTES.md.)

- `query_separation`: per fact and head, the cosine of a held-out phrasing's query with
  the fact's taught direction, against the closest old-text query's;
- `novelty_probe`: a logistic probe of "new fact" fitted on taught phrasings against old
  text, scored (AUC) on held-out phrasings of new and old facts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model_worker.data import Batch, ByteTokenizer
from model_worker.learn.queries import collect_queries, first_answer_char_positions, subject_positions
from model_worker.model import Transformer


def positions(examples: Sequence, tok: ByteTokenizer, kind: str, groups: list[list[int]]
              ) -> tuple[list[Batch], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """`collect_queries` arguments for one position per example, in batches of 64:
    "subject" (the subject's last token) or "first_char" (the query that predicts the
    answer's first character)."""
    examples = list(examples)
    if kind == "subject":
        batches, _, where = subject_positions(examples, tok, 1, 64)
        return batches, groups, where
    batches, where = first_answer_char_positions(examples, tok, 64)
    return batches, groups, where


@torch.no_grad()
def query_separation(model: Transformer, tok: ByteTokenizer, taught: Sequence, heldout: Sequence,
                     background: dict[int, torch.Tensor]) -> dict:
    """Can any key tell a new fact's held-out phrasing from old text? Per position kind
    ("first_char": the query that predicts the answer's first character; "subject":
    the query at the subject's last token), per fact and head: cos of the held-out
    phrasing's query with the fact's mean taught-phrasing direction, the largest cos
    of an old-text query (`background`) with it, and the share of held-out queries
    above that largest one (only those could select a row old text never selects)."""
    names: dict[tuple, int] = {}
    for e in taught:
        names.setdefault((e.subject, e.relation), len(names))
    heldout = [e for e in heldout if (e.subject, e.relation) in names]

    def at(examples, kind):
        groups = [[names[(e.subject, e.relation)] for e in examples[i:i + 64]] for i in range(0, len(examples), 64)]
        return collect_queries(model, *positions(examples, tok, kind, groups))

    out = {}
    for kind in ("first_char", "subject"):
        qt, qh = at(list(taught), kind), at(heldout, kind)
        for layer, (q, gk) in qt.items():
            U, h = len(names), q.shape[1]
            u = F.normalize(torch.zeros(U, h, q.shape[2]).index_add_(0, gk[:, 0], F.normalize(q, dim=-1)), dim=-1)
            q2, g2 = qh[layer][0], qh[layer][1][:, 0]
            own = (F.normalize(q2, dim=-1) * u[g2]).sum(-1)                                   # [P, h]
            bg = F.normalize(background[layer], dim=-1)                                       # [Pb, h, d]
            old = torch.stack([(bg[:, j] @ u[:, j].T).max(0).values for j in range(h)], 1)   # [U, h]
            out[f"layer{layer}_{kind}"] = {"heldout_cos": float(own.mean()), "old_text_max_cos": float(old.mean()),
                                           "heldout_above_old_max": float((own > old[g2]).float().mean())}
    return out


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    s = torch.cat([pos, neg]).double()
    ranks = torch.empty_like(s)
    order = s.argsort()
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    for v in s.unique()[s.unique(return_counts=True)[1] > 1]:            # average the ranks of ties
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    n, m = pos.numel(), neg.numel()
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, weight_decay: float = 1e-3) -> torch.Tensor:
    """A logistic-regression direction [d] (+ bias) separating pos [P, d] from neg [N, d]
    (classes weighted equally)."""
    X = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")
    pw = torch.tensor(len(neg) / max(len(pos), 1), dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(X @ w[:-1] + w[-1], y, pos_weight=pw) \
            + weight_decay * w[:-1].square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach()[:-1].float()


@torch.no_grad()
def novelty_probe(model: Transformer, tok: ByteTokenizer, taught: Sequence, new_heldout: Sequence,
                  old_heldout: Sequence, background: dict[int, torch.Tensor], max_background: int = 20000) -> dict:
    """Is "this is a new fact" a linear function of the knowledge layer's query? Per layer
    and position kind ("first_char": the query that predicts the answer's first character;
    "subject": the subject's last token), a logistic probe (every head's query concatenated)
    fitted on the new facts' taught phrasings against old text (`background`), then scored
    on held-out phrasings: AUC of new facts' against old facts' (0.5: no better than chance;
    what an ungated key or bias can tell at best), and against old text."""
    def at(examples, kind):
        groups = [[0] * len(examples[i:i + 64]) for i in range(0, len(examples), 64)]
        return {i: q.flatten(1) for i, (q, _) in collect_queries(model, *positions(examples, tok, kind, groups)).items()}

    g = torch.Generator().manual_seed(0)
    out = {}
    for kind in ("first_char", "subject"):
        qt, qn, qo = at(taught, kind), at(new_heldout, kind), at(old_heldout, kind)
        for layer, bg in background.items():
            bg = bg.flatten(1)
            bg = bg[torch.randperm(bg.shape[0], generator=g)]
            fit, test = bg[:max_background // 2], bg[max_background // 2:max_background]
            w = fit_probe(qt[layer], fit)
            sn, so, sb = qn[layer] @ w, qo[layer] @ w, test @ w
            out[f"layer{layer}_{kind}"] = {"auc_new_vs_old_heldout": auc(sn, so), "auc_new_heldout_vs_old_text": auc(sn, sb),
                                           "new_heldout": int(sn.numel()), "old_heldout": int(so.numel())}
    return out
