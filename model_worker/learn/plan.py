"""Which rows `learn` appends for new facts (method new_rows), before any training:
their keys, selection biases, and cue / gate tags (gating.py).

- answer rows: keyed on the queries that predict each fact's answer tokens, per
  (fact, phrasing) and per fact (`fact_rows`);
- subject links: a chain of detectors on the last tokens of the subject (links.py); the
  label of its last link opens where the subject's tokens occur in order, and the subject's
  answer rows are gated on it (`gate_on_subject`, `subject_links`);
- or, without `subject_links`, subject rows: keyed on the queries at the last tokens of the
  subject, read like answer rows, and the cue of their subject's answer rows (any one of
  them in a query's top-k opens the gate);
- detectors: for a subject with several new facts, rows keyed on every prompt position
  of each fact's phrasings, in the store's detector partition; a fact's answer rows are
  gated on its detectors' label instead, which opens where its subject's gate is open
  and its evidence beats its sibling facts' (`detectors`).

Labels are row ids: a subject's label is the id of its first subject row (or last-token
link) in that layer, a fact's detector label the id of its first detector there, so labels
never collide within a table. Rows are laid out: answer rows (and subject rows), links,
detectors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import Batch, ByteTokenizer
from ..model import Transformer
from .config import LearnConfig
from .keys import init_new_keys
from .links import subject_links
from .queries import (background_queries, collect_queries, group_batches, group_facts, group_key, group_subjects,
                      prompt_positions, subject_group, subject_index, subject_names, subject_positions)


@dataclass(frozen=True)
class GroupIds:
    """The ids of the row groups a plan keys rows on, one disjoint range per kind. Rows are
    laid out in ascending group id (`init_new_keys`) and take their initial values in that
    order, so the order of the ranges is part of the result:

        subjects (subject_positions)     -1, -2, ...    (subject i: subject_group(i))
        answers per (fact, phrasing)     [0, phrasings)
        answers per fact                 [phrasings, phrasings + facts)
        a fact's detectors               [phrasings + facts, phrasings + 2 facts)
    """
    phrasings: int        # answer groups of group_batches(..., per_phrasing=True) (or per fact)
    facts: int

    def fact(self, f: int) -> int:
        return self.phrasings + f

    def detector(self, f: int) -> int:
        return self.phrasings + self.facts + f

    def fact_of_detector(self, group: int) -> int:
        return group - self.phrasings - self.facts


@dataclass
class NewRows:
    """The rows `learn` appends for new_rows, before any training: keys [M, d_k], selection
    bias [M] (None without select_bias), cue / gate / after labels [M] (None when not gated;
    after None without links), which rows go to the detector partition (detectors and links)
    [M], and per row its group (`GroupIds`) and knowledge layer."""
    keys: torch.Tensor
    bias: torch.Tensor | None
    cue: torch.Tensor | None
    gate: torch.Tensor | None
    groups: torch.Tensor
    layers: torch.Tensor
    info: dict
    after: torch.Tensor | None = None
    detector: torch.Tensor | None = None

    @property
    def is_detector(self) -> torch.Tensor:
        """[M] bool: the rows of the detector partition (gating.py: detectors and links)."""
        if self.detector is not None:
            return self.detector
        return torch.zeros(self.keys.shape[0], dtype=torch.bool)


def plan_new_rows(model: Transformer, examples: Sequence, tok: ByteTokenizer, cfg: LearnConfig,
                  background: Sequence[Batch] | None, first_id: int) -> NewRows:
    """The new rows for `examples` (keys, bias, labels), to be appended at ids first_id + [0, M)."""
    batches, groups = group_batches(examples, tok, cfg.batch_size, cfg.key_per_phrasing)
    ids = GroupIds(len(group_subjects(examples, cfg.key_per_phrasing)), len(group_subjects(examples, False)))
    bgq = background_queries(model, background) if background and cfg.calibrate else None
    gated = cfg.gate_on_subject and cfg.subject_rows and cfg.answer_rows
    links = gated and cfg.subject_links
    queries = collect_queries(model, batches, groups) if cfg.answer_rows else {}
    if cfg.answer_rows and cfg.fact_rows and cfg.key_per_phrasing:
        fq = collect_queries(model, *group_batches(examples, tok, cfg.batch_size, False))
        queries = {i: (torch.cat([q, fq[i][0]]), torch.cat([g, fq[i][1] + torch.tensor([ids.fact(0), 0])]))
                   for i, (q, g) in queries.items()}
    if cfg.subject_rows and not links:
        sq = collect_queries(model, *subject_positions(examples, tok, cfg.subject_rows, cfg.batch_size,
                                                       cfg.cue_per_phrasing))
        queries = {i: (torch.cat([queries[i][0], q]), torch.cat([queries[i][1], g])) if i in queries else (q, g)
                   for i, (q, g) in sq.items()}
    keys, info = init_new_keys(model, queries, cfg.key_margin,
                               cfg.max_new_rows, cfg.seed, background=bgq, contrast=cfg.contrast,
                               bg_quantile=cfg.bg_quantile, select_bias=cfg.select_bias,
                               select_margin=cfg.select_margin, whiten=cfg.whiten)
    bias = info.pop("bias", None)
    row_groups, row_layers = info.pop("row_groups"), info.pop("row_layers")
    if not gated:
        return NewRows(keys, bias, None, None, row_groups, row_layers, info)
    answer = dict(enumerate(group_subjects(examples, cfg.key_per_phrasing)))
    if cfg.fact_rows and cfg.key_per_phrasing:
        answer.update({ids.fact(f): s for f, s in enumerate(group_subjects(examples, False))})
    names: dict[int, str] = {}
    if links:
        found = subject_links(model, examples, tok, cfg.subject_rows, cfg.batch_size, bgq, cfg.link_margin,
                              first_id + keys.shape[0])
        subject_label = found.labels if found is not None else {}
        cue = torch.full((keys.shape[0],), -1, dtype=torch.int64)
        gate = torch.tensor([subject_label.get((int(lay), answer[int(g)]), -1) if int(g) in answer else -1
                             for g, lay in zip(row_groups, row_layers)], dtype=torch.int64)
    else:
        cues = {subject_group(i): s for i, s in enumerate(subject_names(examples, cfg.cue_per_phrasing))}
        cue, gate = cue_gates(row_groups, row_layers, first_id, answer, cues)
        subject_label = _cue_labels(cue, row_groups, row_layers, subject_names(examples, cfg.cue_per_phrasing))
    if bias is not None:
        bias = bias.masked_fill(gate >= 0, 0.0)     # the gate keeps old text off them instead
    if cfg.gated_key_norm != "own" and bool((gate >= 0).any()):
        norms = keys[gate >= 0].norm(dim=-1)
        target = norms.median() if cfg.gated_key_norm == "median" else norms.max()
        keys[gate >= 0] = keys[gate >= 0] * (target / norms.clamp_min(1e-6))[:, None]
    rows = NewRows(keys, bias, cue, gate, row_groups, row_layers, info,
                   after=torch.full_like(cue, -1), detector=torch.zeros(keys.shape[0], dtype=torch.bool))
    if links and found is not None:
        _append(rows, found.keys, found.bias, found.cue, torch.full_like(found.cue, -1), found.after, found.groups,
                found.layers, detector=True)
        names.update(found.names)
    if cfg.detectors:
        extra = _add_detectors(model, examples, tok, cfg, ids, rows.groups, rows.layers, rows.gate, subject_label,
                               first_id + rows.keys.shape[0])
        if extra is not None:
            dk, db, dc, dg, dgroups, dlayers = extra
            _append(rows, dk, db, dc, dg, torch.full_like(dc, -1), dgroups, dlayers, detector=True)
    if not links:
        rows.after = None
    cue, gate = rows.cue, rows.gate
    detector = (cue >= 0) & (gate >= 0)
    # counted as the store counts them: gated rows include the detectors
    info.update(cue_rows=int(((cue >= 0) & (gate < 0) & ~rows.detector).sum()), gated_rows=int((gate >= 0).sum()),
                detector_rows=int(detector.sum()), link_rows=int((rows.detector & ~detector).sum()),
                labels={**names, **_label_names(subject_names(examples, cfg.cue_per_phrasing), examples, cue,
                                                rows.groups, ids, rows.detector & ~detector)})
    return rows


def _append(rows: NewRows, keys: torch.Tensor, bias: torch.Tensor, cue: torch.Tensor, gate: torch.Tensor,
            after: torch.Tensor, groups: torch.Tensor, layers: torch.Tensor, detector: bool) -> None:
    """Append rows to `rows` in place (a missing bias is 0)."""
    old_bias = rows.bias if rows.bias is not None else torch.zeros(rows.keys.shape[0])
    rows.keys, rows.bias = torch.cat([rows.keys, keys]), torch.cat([old_bias, bias])
    rows.cue, rows.gate, rows.after = torch.cat([rows.cue, cue]), torch.cat([rows.gate, gate]), \
        torch.cat([rows.after, after])
    rows.groups, rows.layers = torch.cat([rows.groups, groups]), torch.cat([rows.layers, layers])
    rows.detector = torch.cat([rows.detector, torch.full((keys.shape[0],), detector)])


def _cue_labels(cue: torch.Tensor, row_groups: torch.Tensor, row_layers: torch.Tensor,
                names: Sequence[str]) -> dict[tuple[int, str], int]:
    """(layer, subject) -> its cue label, from the subject rows `cue_gates` labelled."""
    out: dict[tuple[int, str], int] = {}
    for r in torch.nonzero(cue >= 0).flatten().tolist():
        out.setdefault((int(row_layers[r]), names[subject_index(int(row_groups[r]))]), int(cue[r]))
    return out


def cue_gates(row_groups: torch.Tensor, row_layers: torch.Tensor, first_id: int,
              answer_subjects: dict[int, str], cue_subjects: dict[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cue and gate labels for rows about to be appended at ids first_id + [0, M): the
    rows of a subject's subject positions become its cue (label: the id of its first
    such row in that layer, unique across the table), the answer rows of its facts are
    gated on it. Rows whose subject has no cue row in their layer stay ungated."""
    M = row_groups.numel()
    cue, gate = torch.full((M,), -1, dtype=torch.int64), torch.full((M,), -1, dtype=torch.int64)
    label: dict[tuple[int, str], int] = {}
    for r in range(M):
        g, layer = int(row_groups[r]), int(row_layers[r])
        if g in cue_subjects:
            cue[r] = label.setdefault((layer, cue_subjects[g]), first_id + r)
    for r in range(M):
        g, layer = int(row_groups[r]), int(row_layers[r])
        if g in answer_subjects and (layer, answer_subjects[g]) in label:
            gate[r] = label[(layer, answer_subjects[g])]
    return cue, gate


@torch.no_grad()
def fact_detectors(queries: dict[int, tuple[torch.Tensor, torch.Tensor]], fact_subjects: Sequence[str],
                   prune: float) -> dict[int, tuple[torch.Tensor, ...]]:
    """Detector rows from `prompt_positions` queries (layer -> (q [P, h, d_k], (fact, position)
    [P, 2])): per layer (keys [R, d_k], bias [R], fact [R], position [R]). One candidate per
    query and head, its key the query's direction; its bias minus its best cosine with any
    query (any head) of a sibling fact (same subject, another fact), so that its evidence
    cos(q, key) + bias is positive only where a prompt looks more like this fact's phrasing
    than any sibling's ever did. Facts without siblings get none, nor do candidates whose
    best sibling cosine reaches `prune` (but for each fact's least ambiguous one)."""
    out = {}
    subject_of = {s: i for i, s in enumerate(dict.fromkeys(fact_subjects))}
    for layer, (q, gk) in queries.items():
        P, h, d = q.shape
        u = F.normalize(q.float(), dim=-1).reshape(P * h, d)
        fact, pos = gk[:, 0].repeat_interleave(h), gk[:, 1].repeat_interleave(h)
        subj = torch.tensor([subject_of[fact_subjects[f]] for f in fact.tolist()], dtype=torch.int64)
        theta = torch.full((P * h,), float("inf"))
        for sid in torch.unique(subj).tolist():
            rows = torch.nonzero(subj == sid).flatten()
            f = fact[rows]
            if torch.unique(f).numel() < 2:
                continue
            cos = (u[rows] @ u[rows].T).masked_fill(f[:, None] == f[None], float("-inf"))
            theta[rows] = cos.max(1).values
        keep = theta < prune
        # ... but every fact with siblings keeps its least ambiguous candidate, so that it takes
        # part in its subject's contest (its own phrasings still clear the bias)
        has = torch.isfinite(theta)
        if bool(has.any()):
            f, t = fact[has], theta[has]
            best = torch.full((int(f.max()) + 1,), float("inf")).scatter_reduce(0, f, t, "amin")
            keep |= has & (theta == best[fact.clamp_max(best.numel() - 1)])
        out[layer] = (u[keep], -theta[keep], fact[keep], pos[keep])
    return out


def _add_detectors(model: Transformer, examples: Sequence, tok: ByteTokenizer, cfg: LearnConfig, ids: GroupIds,
                   row_groups: torch.Tensor, row_layers: torch.Tensor, gate: torch.Tensor,
                   subject_label: dict[tuple[int, str], int], first_id: int) -> tuple[torch.Tensor, ...] | None:
    """Detectors for the facts of subjects with several facts (`fact_detectors`), appended at
    ids first_id + [0, D): their labels (cue: the fact's label, the id of its first detector in
    that layer; gate: its subject's label there, `subject_label` (layer, subject) -> label), and
    the fact's answer rows re-gated on the fact's label (in place). Returns (keys, bias, cue,
    gate, groups, layers) or None."""
    fact_subjects = group_subjects(examples, False)
    found = fact_detectors(collect_queries(model, *prompt_positions(examples, tok, cfg.batch_size)),
                           fact_subjects, cfg.detector_prune)
    fact_of_group = dict(enumerate(group_facts(examples, cfg.key_per_phrasing)))
    fact_of_group.update({ids.fact(f): f for f in range(len(fact_subjects))})
    parts, fact_label, next_id = [], {}, first_id
    for layer, (keys, bias, fact, _) in found.items():
        gates = torch.tensor([subject_label.get((layer, fact_subjects[f]), -1) for f in fact.tolist()],
                             dtype=torch.int64)
        keep = gates >= 0                                                 # a subject without a cue: no detectors
        keys, bias, fact, gates = keys[keep], bias[keep], fact[keep], gates[keep]
        labels = torch.empty_like(fact)
        for i, f in enumerate(fact.tolist()):
            labels[i] = fact_label.setdefault((layer, f), next_id + i)
        parts.append((keys, bias, labels, gates, ids.detector(0) + fact, torch.full_like(fact, layer)))
        next_id += fact.numel()
    if not fact_label:
        return None
    for r in torch.nonzero(gate >= 0).flatten().tolist():                # answer rows: open by their fact's evidence
        label = fact_label.get((int(row_layers[r]), fact_of_group.get(int(row_groups[r]), -1)))
        if label is not None:
            gate[r] = label
    return tuple(torch.cat(c) for c in zip(*parts))


def _label_names(subjects: Sequence[str], examples: Sequence, cue: torch.Tensor,
                 row_groups: torch.Tensor, ids: GroupIds, skip: torch.Tensor) -> dict[int, str]:
    """What each cue label stands for: "subject X" for a subject's cue, "X -> answer" for a
    fact's detectors (label -> name, for `interpret.explain`); rows in `skip` (links, named by
    links.py) are left out. subjects: `subject_names`."""
    facts: dict[tuple, str] = {}
    for e in examples:
        facts.setdefault(group_key(e, False), f"{e.subject} -> {getattr(e, 'answer', '') or e.completion.strip()}")
    fact_names = list(facts.values())
    out = {}
    for r in torch.nonzero((cue >= 0) & ~skip).flatten().tolist():
        g = int(row_groups[r])
        out.setdefault(int(cue[r]), f"subject {subjects[subject_index(g)]}" if g < 0
                       else fact_names[ids.fact_of_detector(g)])
    return out
