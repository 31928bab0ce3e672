"""Gated rows: which flat rows a knowledge layer may select where in a sequence.

The store keeps generic per-row tags and partitions (DESIGN.md section 7); what they
mean for gating is decided here, and `learn` (model_worker.learn) writes rows that
follow it:

- Cues and gates: flat rows may carry the tags "cue" and "gate" (int64 labels, -1 =
  none). A row with gate g may be selected at a position of a sequence only once
  label g is open there. A label opens at the first position where a row with it as
  cue is in the top-k taken over the ungated candidates (so a gated row never opens a
  gate), and stays open for the rest of the sequence.
- Detectors: rows in partition DETECTOR_PARTITION, with a cue c and a gate g. The store
  never reads them out and leaves them out of the top-k; a side query of the same search
  returns the best `detector_pool` per query, scored by cos(q, key) + bias. That score is
  evidence for label c against the other labels whose detectors share gate g: label c
  opens at a position where g is open and c's best evidence so far in the sequence (at
  that position or an earlier one) is the highest of them (`family_winners`).
- Links: detectors with a cue c and no gate. A link holds at a position where its score
  cos(q, key) + bias is positive and, if it carries the tag "after" = a, label a held at the
  position just before; label c opens where it holds (and stays open, as a cue's label does).
  A chain of links (each after the previous) opens its last label only where the whole
  token sequence it was keyed on is present in order: `learn` keys one chain on a subject's
  last tokens, so that the subject, not one of its tokens, opens its facts' gates (the
  tokens of a subject recur in other words; the sequence rarely does).

During generation a `GateState` per knowledge layer carries what was open at the end of
one model call into the next (the model's `setup_caches` makes them, `clear_caches`
drops them), so that decoding token by token opens the same gates as one forward over
the whole sequence. A call that starts at position 0 starts a new sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CUE_TAG = "cue"
GATE_TAG = "gate"
AFTER_TAG = "after"             # a link's predecessor in its chain (-1: the chain's first link)
GATE_TAGS = (CUE_TAG, GATE_TAG, AFTER_TAG)
DETECTOR_PARTITION = 1          # the store's partition that holds detectors (never in the top-k)


@dataclass
class FlatCandidates:
    """The flat rows a search returned for a batch of queries [T]: selection scores [T, C]
    and their cue / gate labels [T, C] (-1: none, and at padding)."""
    scores: torch.Tensor
    cue: torch.Tensor
    gate: torch.Tensor


@dataclass
class DetectorHits:
    """The best detectors per query [T] (the search's side result): scores [T, m]
    (cos(q, key) + bias; -inf at padding) and their labels [T, m] (-1 at padding; `after`
    None: no links)."""
    scores: torch.Tensor
    cue: torch.Tensor
    gate: torch.Tensor
    after: torch.Tensor | None = None


@dataclass
class GateRecord:
    """What one layer's gates did on one call: labels [G] (sorted), opened [B, S, G] (label
    open at that position) and evidence [B, S, G] (a detector label's best score so far;
    -inf for other labels)."""
    labels: torch.Tensor
    opened: torch.Tensor
    evidence: torch.Tensor


class GateState:
    """One knowledge layer's gates over the sequences of a generation, carried from one
    model call to the next like a KV cache: per label seen so far, whether it is open (a cue
    fired or a link held: fired [B, G]), whether its link held at the last position (held
    [B, G]: a chain goes on from there), its best detector evidence (evidence [B, G]) and the
    label of the gate its detectors compete under (family [G], -1 for none). Empty until a
    call on a table with gated rows has run."""

    def __init__(self) -> None:
        self.labels: torch.Tensor | None = None
        self.fired: torch.Tensor | None = None
        self.held: torch.Tensor | None = None
        self.evidence: torch.Tensor | None = None
        self.family: torch.Tensor | None = None

    @property
    def is_empty(self) -> bool:
        return self.labels is None

    def clear(self) -> None:
        self.labels = self.fired = self.held = self.evidence = self.family = None

    def carried(self, batch: int, input_pos: torch.Tensor | None) -> "GateState | None":
        """The state to continue from on a call at input_pos [S] with `batch` sequences:
        None for a new sequence (position 0), an empty state, or another batch."""
        if input_pos is None or int(input_pos[0]) == 0 or self.is_empty or self.fired.shape[0] != batch:
            return None
        return self

    def keep(self, labels: torch.Tensor, fired: torch.Tensor, held: torch.Tensor, evidence: torch.Tensor,
             family: torch.Tensor) -> None:
        self.labels, self.fired, self.held, self.evidence, self.family = labels, fired, held, evidence, family


def family_winners(is_open: torch.Tensor, evidence: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
    """Detector labels that open: is_open [B, S, G] (labels whose cue fired so far), evidence
    [B, S, G] (a detector label's best score so far, -inf where none), family [G] (the column
    of the gate a label's detectors compete under, -1 for labels without detectors) ->
    [B, S, G]: where a label's gate is open and its evidence is the highest of its family."""
    has = family >= 0
    if not bool(has.any()):
        return torch.zeros_like(is_open)
    fam = family.clamp_min(0).expand_as(evidence)
    best = torch.full_like(evidence, float("-inf")).scatter_reduce(
        2, fam, evidence.masked_fill(~has, float("-inf")), "amax")
    return has & ~torch.isneginf(evidence) & (evidence >= best.gather(2, fam)) & is_open.gather(2, fam)


def close_gates(prod_scores: torch.Tensor, flat: FlatCandidates, found: DetectorHits | None,
                shape: tuple[int, int, int], k: int, state: GateState | None = None,
                input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, GateRecord]:
    """The flat candidates' scores [T, C] with -inf where the row's gate is closed at its
    position, and what the gates did. prod_scores [T, k]: the product rows' top-k (they
    take part in deciding which cues fire); shape (B, S, h): the tokens and heads behind
    the T = B*S*h queries; k: rows per head. With a `state`, a call at input_pos > 0
    continues from it, and the state is updated to this call's end."""
    B, S, h = shape
    scores, cue, gate = flat.scores, flat.cue, flat.gate
    dev = scores.device
    is_gated = gate >= 0
    fired = _fired_cues(prod_scores, scores, cue, is_gated, k)                        # [T, k]
    carry = state.carried(B, input_pos) if state is not None else None
    det = found is not None and bool((found.cue >= 0).any())
    after = None
    parts = [fired[fired >= 0], gate[is_gated]]
    if det:
        after = found.after if found.after is not None else torch.full_like(found.cue, -1)
        parts += [found.cue[found.cue >= 0], found.gate[found.gate >= 0], after[after >= 0]]
    if carry is not None:
        parts += [carry.labels.to(dev), carry.family[carry.family >= 0].to(dev)]
    labels = torch.unique(torch.cat(parts))                                          # [G] sorted
    G = labels.numel()
    if G == 0:
        if state is not None:
            state.clear()
        none = torch.zeros(B, S, 0, device=dev)
        return scores, GateRecord(labels, none.bool(), none)
    tok = torch.arange(B * S * h, device=dev) // h                                   # row -> token b*S + s
    col = lambda lab: torch.searchsorted(labels, lab)                               # noqa: E731 - label -> column
    was = col(carry.labels.to(dev)) if carry is not None else None                   # every carried label is in labels
    is_open = torch.zeros(B * S, G, dtype=torch.bool, device=dev)
    hit = fired >= 0
    is_open[tok[:, None].expand_as(fired)[hit], col(fired[hit])] = True
    held = torch.zeros(B, S, G, dtype=torch.bool, device=dev)
    if det:
        prev_held = torch.zeros(B, G, dtype=torch.bool, device=dev)
        if carry is not None:
            prev_held[:, was] = carry.held.to(dev)
        held = _held_links(found, after, tok, col, (B, S, G), prev_held)
    is_open = (is_open.view(B, S, G) | held).int().cummax(1).values.bool()           # open from where it fired on
    evidence = torch.full((B, S, G), float("-inf"), device=dev)
    family = torch.full((G,), -1, dtype=torch.int64, device=dev)                    # detector label -> its gate's column
    if det:
        hit = (found.cue >= 0) & (found.gate >= 0)                                   # detectors (links have no gate)
        rows = tok[:, None].expand_as(found.cue)[hit]
        evidence.view(-1).scatter_reduce_(0, rows * G + col(found.cue[hit]), found.scores[hit].float(), "amax")
        evidence = evidence.cummax(1).values                                         # the best so far in the sequence
        family[col(found.cue[hit])] = col(found.gate[hit])
    if carry is not None:
        prev = torch.zeros(B, G, dtype=torch.bool, device=dev)
        prev[:, was] = carry.fired.to(dev)
        is_open |= prev[:, None]
        prev_ev = torch.full((B, G), float("-inf"), device=dev)
        prev_ev[:, was] = carry.evidence.to(dev)
        evidence = torch.maximum(evidence, prev_ev[:, None])
        known = carry.family.to(dev) >= 0
        family[was[known]] = col(carry.family.to(dev)[known])
    if state is not None:
        state.keep(labels, is_open[:, -1], held[:, -1], evidence[:, -1],
                   torch.where(family >= 0, labels[family.clamp_min(0)], -1))
    opened = is_open | family_winners(is_open, evidence, family)
    gi = col(gate.clamp_min(0)).clamp_max(G - 1)
    ok = opened.view(B * S, G)[tok[:, None].expand_as(gate), gi] & (labels[gi] == gate)
    return scores.masked_fill(is_gated & ~ok, float("-inf")), GateRecord(labels, opened, evidence)


def _held_links(found: DetectorHits, after: torch.Tensor, tok: torch.Tensor, col, shape: tuple[int, int, int],
                prev_held: torch.Tensor) -> torch.Tensor:
    """Where each link label holds [B, S, G]: one of its links scores > 0 there (any head) and
    its `after` label (if any) held at the position before (prev_held [B, G]: at the last
    position of the previous call). A chain advances one position per round, so the rounds
    stop once nothing changes (at most S + 1 of them)."""
    B, S, G = shape
    dev = prev_held.device
    link = (found.cue >= 0) & (found.gate < 0) & (found.scores > 0)
    if not bool(link.any()):
        return torch.zeros(B, S, G, dtype=torch.bool, device=dev)
    hit = torch.zeros(B * S, G, dtype=torch.bool, device=dev)
    hit[tok[:, None].expand_as(found.cue)[link], col(found.cue[link])] = True
    hit = hit.view(B, S, G)
    a = after[link]
    after_col = torch.full((G,), -1, dtype=torch.int64, device=dev)                 # a label's chain predecessor
    after_col[col(found.cue[link])] = torch.where(a >= 0, col(a.clamp_min(0)), -1)
    first = after_col < 0
    held = hit & first
    for _ in range(S + 1):
        before = torch.cat([prev_held[:, None], held[:, :-1]], 1)                   # held at the position before
        grown = hit & (first | before[..., after_col.clamp_min(0)])
        if torch.equal(grown, held):
            break
        held = grown
    return held


def _fired_cues(prod_scores: torch.Tensor, scores: torch.Tensor, cue: torch.Tensor, is_gated: torch.Tensor,
                k: int) -> torch.Tensor:
    """The cue labels [T, k] of the cue rows in each query's top-k over the ungated
    candidates (product rows included; -1 elsewhere)."""
    cand = torch.cat([prod_scores, scores.masked_fill(is_gated, float("-inf"))], 1)
    cues = torch.cat([torch.full_like(prod_scores, -1, dtype=torch.int64), cue], 1)
    s, top = cand.topk(k, dim=1)
    return cues.gather(1, top).masked_fill(torch.isneginf(s), -1)
