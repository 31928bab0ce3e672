"""Subject links: the chain of detectors that opens a subject's gate (gating.py, "Links").

A subject's gate must open where the prompt names the subject, and nowhere else. One
token's query cannot decide that: the subject's tokens recur in other words and names
(on a tiny random model a query is little more than its token: cos >= 0.99 between the
same byte in "Veltria" and in "France"; on the continual benchmark's base, cue rows keyed
on single subject tokens fired in a quarter of the old facts' prompts). So the subject's
last n tokens become a chain:

- one link row per (phrasing, token, head), keyed on that query's direction, in the
  detector partition (never read, never in the top-k);
- its bias puts its score cos(q, key) + bias at -`margin` on the closest *negative*
  query: old text (`background`, when given) and every prompt position of the new facts
  outside this subject's name (other subjects' names, the relation words): a link holds
  only where a query is closer to its key than any of those;
- links of one (subject, token) share a label, each `after` the label of the token
  before it, so the label of the subject's last token, on which its facts' rows are
  gated, opens only where the subject's last n tokens hold in order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import ByteTokenizer, collate_examples
from ..model import Transformer
from .queries import (answer_only, collect_queries, subject_group, subject_names, subject_positions,
                      subject_span)


@dataclass
class SubjectLinks:
    """Link rows to append at ids first_id + [0, R): keys [R, d_k] (unit), bias [R], cue (the
    link's label) [R], after (its predecessor's label, -1 for a chain's first link) [R],
    groups (`subject_group` of the subject's index in `subject_names`) [R], layers [R], token
    offsets (0: the subject's last token) [R]; labels: (layer, subject) -> the subject's label
    (its last token's); names: label -> what it stands for."""
    keys: torch.Tensor
    bias: torch.Tensor
    cue: torch.Tensor
    after: torch.Tensor
    groups: torch.Tensor
    layers: torch.Tensor
    offsets: torch.Tensor
    labels: dict[tuple[int, str], int]
    names: dict[int, str]


@torch.no_grad()
def subject_links(model: Transformer, examples: Sequence, tok: ByteTokenizer, n_last: int, batch_size: int,
                  background: dict[int, torch.Tensor] | None, margin: float, first_id: int) -> SubjectLinks | None:
    """Links on the last `n_last` tokens of every subject named in its prompts (None: none is).
    background: old-text queries per layer [P, h, d_k] (`background_queries`), or None."""
    subjects = subject_names(examples, False)
    sid = {s: i for i, s in enumerate(subjects)}
    phrasing_subject = subject_names(examples, True)
    found = collect_queries(model, *subject_positions(examples, tok, n_last, batch_size, per_phrasing=True))
    negatives = _prompt_queries(model, examples, tok, batch_size, sid)
    keys, bias, subj, offsets, layers = [], [], [], [], []
    for layer, (q, gk) in found.items():
        P, h, d = q.shape
        u = F.normalize(q.float(), dim=-1).reshape(P * h, d)
        s = torch.tensor([sid[phrasing_subject[-1 - int(g)]] for g in gk[:, 0]], dtype=torch.int64)
        s = s.repeat_interleave(h)
        theta = _closest_negative(u, s, negatives.get(layer), background.get(layer) if background else None)
        keys.append(u)
        bias.append(-(theta + margin))
        subj.append(s)
        offsets.append(gk[:, 1].repeat_interleave(h))
        layers.append(torch.full((P * h,), layer, dtype=torch.int64))
    if not keys or not sum(k.shape[0] for k in keys):
        return None
    keys, bias, subj, offsets, layers = (torch.cat(x) for x in (keys, bias, subj, offsets, layers))
    label: dict[tuple[int, int, int], int] = {}
    for r, key in enumerate(zip(layers.tolist(), subj.tolist(), offsets.tolist())):
        label.setdefault(key, first_id + r)
    cue = torch.tensor([label[k] for k in zip(layers.tolist(), subj.tolist(), offsets.tolist())], dtype=torch.int64)
    after = torch.tensor([label.get((lay, s, o + 1), -1) for lay, s, o in zip(layers.tolist(), subj.tolist(),
                                                                           offsets.tolist())], dtype=torch.int64)
    names = {lab: f"subject {subjects[s]}" + (f", token -{o}" if o else "") for (_, s, o), lab in label.items()}
    ends = {(lay, subjects[s]): lab for (lay, s, o), lab in label.items() if o == 0}
    return SubjectLinks(keys.contiguous(), bias.float().contiguous(), cue, after,
                        torch.tensor([subject_group(int(s)) for s in subj], dtype=torch.int64), layers, offsets,
                        ends, names)


def _prompt_queries(model: Transformer, examples: Sequence, tok: ByteTokenizer, batch_size: int,
                    sid: dict[str, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every prompt position's query after BOS, per layer: (q [N, h, d_k], subject [N]): the
    index of the example's subject where the position lies in its name, else -1."""
    batches, groups, at = [], [], []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = collate_examples(chunk, tok, answer_only(examples))
        mask = torch.zeros(batch.inputs.shape, dtype=torch.bool)
        in_name = torch.zeros(batch.inputs.shape, dtype=torch.int64)
        for i, e in enumerate(chunk):
            mask[i, 1:len(tok.encode(getattr(e, "prompt", ""), bos=True))] = True
            span = subject_span(e, tok)
            if span is not None:
                in_name[i, span[0]:span[1] + 1] = 1
        batches.append(batch)
        groups.append([sid.get(getattr(e, "subject", ""), -1) for e in chunk])
        at.append((mask, in_name))
    out = {}
    for layer, (q, gk) in collect_queries(model, batches, groups, at).items():
        out[layer] = (q, torch.where(gk[:, 1] == 1, gk[:, 0], -1))
    return out


def _closest_negative(u: torch.Tensor, subj: torch.Tensor, prompts: tuple[torch.Tensor, torch.Tensor] | None,
                      background: torch.Tensor | None, chunk: int = 256) -> torch.Tensor:
    """[R]: each link key's best cosine with a negative query (any head): the new prompts'
    positions but those in its own subject's name, and old text. -1 where there is none."""
    theta = torch.full((u.shape[0],), -1.0)
    if prompts is not None and prompts[0].shape[0]:
        q, owner = prompts
        h = q.shape[1]
        nq = F.normalize(q.float(), dim=-1).reshape(-1, q.shape[-1])
        owner = owner.repeat_interleave(h)
        for c in range(0, u.shape[0], chunk):
            cos = (nq @ u[c:c + chunk].T).masked_fill(owner[:, None] == subj[None, c:c + chunk], float("-inf"))
            theta[c:c + chunk] = torch.maximum(theta[c:c + chunk], cos.max(0).values)
    if background is not None and background.shape[0]:
        nb = F.normalize(background.float(), dim=-1).reshape(-1, background.shape[-1])
        for c in range(0, u.shape[0], chunk):
            theta[c:c + chunk] = torch.maximum(theta[c:c + chunk], (nb @ u[c:c + chunk].T).max(0).values)
    return theta
