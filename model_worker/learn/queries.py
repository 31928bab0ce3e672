"""The knowledge layers' queries on the new text, grouped: what `learn`'s new rows are keyed on.

`collect_queries(model, batches, groups, at)` runs the frozen model and keeps, per
knowledge layer, the query of every head at chosen positions, each keyed by
(group, label). The helpers below make its arguments:

- `group_batches`: the answer positions of every example, grouped by fact (or by
  (fact, phrasing));
- `subject_positions`: the last tokens of each example's subject, grouped by subject
  (or by (subject, phrasing)); subject groups are negative (`subject_group`), so they
  never collide with answer groups;
- `prompt_positions`: every prompt position, grouped by fact (for detectors);
- `subject_span`: where an example's prompt names its subject;
- `background_queries`: every position of old text (what new rows must stay off).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import Batch, ByteTokenizer, collate_examples
from ..model import Transformer


def subject_group(i: int) -> int:
    """The group id of the i-th subject (or (subject, phrasing)) of `subject_positions`."""
    return -1 - i


def subject_index(group: int) -> int:
    """The inverse of `subject_group`."""
    return -1 - group


@torch.no_grad()
def collect_queries(model: Transformer, batches: Sequence[Batch], groups: Sequence[Sequence[int]],
                    at: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per knowledge layer (block index) -> (queries [P, h, d_k], group key [P, 2]) at
    every scored position: key = (group of the example, index of the position among
    the example's scored positions). groups[b][row] is the group of batch b's row.
    at[b] = (mask [B, S] bool, label [B, S] int64): these positions instead, keyed
    (group, label)."""
    kls = {i: b.knowledge for i, b in enumerate(model.layers) if b.knowledge is not None}
    captured: dict[int, torch.Tensor] = {}
    hooks = [kl.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
             for i, kl in kls.items()]
    out: dict[int, list] = {i: [] for i in kls}
    was = model.training
    model.eval()
    try:
        with model.reading(readout="fetch"):
            for b, (batch, grp) in enumerate(zip(batches, groups)):
                model(batch.inputs)
                if at is None:
                    scored = batch.targets != -100                            # [B, S]
                    pos = (scored.cumsum(1) - 1)[scored]                      # index among scored
                else:
                    scored, label = at[b]
                    pos = label[scored]
                g = torch.as_tensor(grp, dtype=torch.int64)[:, None].expand_as(scored)[scored]
                for i, kl in kls.items():
                    x = captured[i]                                           # [B, S, D]
                    B, S, _ = x.shape
                    q = kl.q_norm(kl.wq(x).view(B, S, kl.n_heads, kl.d_k)).float()
                    out[i].append((q[scored], torch.stack([g, pos], 1)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {i: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for i, v in out.items() if v}


@torch.no_grad()
def background_queries(model: Transformer, batches: Sequence[Batch], max_per_layer: int = 65536,
                       seed: int = 0) -> dict[int, torch.Tensor]:
    """Old-text queries per knowledge layer [P, h, d_k] (every position), subsampled."""
    groups = [[0] * b.inputs.shape[0] for b in batches]
    full = [Batch(b.inputs, torch.zeros_like(b.targets)) for b in batches]   # every position "scored"
    out = {}
    g = torch.Generator().manual_seed(seed)
    for layer, (q, _) in collect_queries(model, full, groups).items():
        if q.shape[0] > max_per_layer:
            q = q[torch.randperm(q.shape[0], generator=g)[:max_per_layer]]
        out[layer] = q
    return out


# -- groupings ------------------------------------------------------------------------------

def answer_only(examples: Sequence) -> bool:
    """Score only the answers when every example has a prompt (plain sentences: all of it)."""
    return all(getattr(e, "prompt", "") for e in examples)


def group_key(e, per_phrasing: bool) -> tuple:
    """What makes an example's group: its fact (subject, relation), and its phrasing with per_phrasing."""
    return (e.subject, e.relation) + ((e.prompt,) if per_phrasing else ())


def cue_key(e, per_phrasing: bool) -> tuple:
    """What makes an example's subject group: its subject, and its phrasing with per_phrasing."""
    subject = getattr(e, "subject", "")
    return (subject, getattr(e, "prompt", "")) if per_phrasing else (subject,)


def group_batches(examples: Sequence, tok: ByteTokenizer, batch_size: int, per_phrasing: bool = False
                  ) -> tuple[list[Batch], list[list[int]]]:
    """All examples once; group = the fact (subject, relation) of each row (and its
    phrasing, with per_phrasing), numbered from 0 in order of appearance."""
    names: dict[tuple, int] = {}
    gid = [names.setdefault(group_key(e, per_phrasing), len(names)) for e in examples]
    batches, groups = [], []
    for s in range(0, len(examples), batch_size):
        batches.append(collate_examples(examples[s:s + batch_size], tok, answer_only(examples)))
        groups.append(gid[s:s + batch_size])
    return batches, groups


def group_subjects(examples: Sequence, per_phrasing: bool = False) -> list[str]:
    """The subject of each of `group_batches`' groups (list index = group id)."""
    names: dict[tuple, str] = {}
    for e in examples:
        names.setdefault(group_key(e, per_phrasing), e.subject)
    return list(names.values())


def group_facts(examples: Sequence, per_phrasing: bool) -> list[int]:
    """The fact (per-fact group id) of each of `group_batches`' groups (list index = group id)."""
    facts: dict[tuple, int] = {}
    groups: dict[tuple, int] = {}
    for e in examples:
        groups.setdefault(group_key(e, per_phrasing), facts.setdefault(group_key(e, False), len(facts)))
    return list(groups.values())


def subject_names(examples: Sequence, per_phrasing: bool = False) -> list[str]:
    """The subject of each of `subject_positions`' groups: group subject_group(i) is subject_names[i]."""
    groups: dict[tuple, str] = {}
    for e in examples:
        groups.setdefault(cue_key(e, per_phrasing), getattr(e, "subject", ""))
    return list(groups.values())


# -- positions -------------------------------------------------------------------------------

def subject_span(e, tok: ByteTokenizer) -> tuple[int, int] | None:
    """The input indices (first, last) of the tokens of e's subject, where its prompt names it
    last (BOS is index 0); None when the prompt does not contain it."""
    subj = getattr(e, "subject", "")
    j = e.prompt.rfind(subj) if subj else -1
    if j < 0:
        return None
    return len(tok.encode(e.prompt[:j], bos=True)), len(tok.encode(e.prompt[:j + len(subj)], bos=True)) - 1


def subject_positions(examples: Sequence, tok: ByteTokenizer, n_last: int, batch_size: int,
                      per_phrasing: bool = False
                      ) -> tuple[list[Batch], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every example once, with the input positions of the last `n_last` tokens of its
    subject in the prompt (labelled 0 = last token, 1 = the one before, ...) and its
    group = the subject, or the (subject, prompt) pair with per_phrasing (`subject_group`
    ids). Examples whose prompt does not contain their subject contribute no position."""
    names: dict[tuple, int] = {}
    batches, groups, at = [], [], []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = collate_examples(chunk, tok, answer_only(examples))
        mask = torch.zeros(batch.inputs.shape, dtype=torch.bool)
        label = torch.zeros(batch.inputs.shape, dtype=torch.int64)
        grp = []
        for i, e in enumerate(chunk):
            grp.append(subject_group(names.setdefault(cue_key(e, per_phrasing), len(names))))
            span = subject_span(e, tok)
            if span is None:
                continue
            first, last = span
            for off in range(min(n_last, last - first + 1)):
                mask[i, last - off], label[i, last - off] = True, off
        batches.append(batch)
        groups.append(grp)
        at.append((mask, label))
    return batches, groups, at


def prompt_positions(examples: Sequence, tok: ByteTokenizer, batch_size: int
                     ) -> tuple[list[Batch], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """`collect_queries` arguments: every example once, at every input position of its prompt
    after BOS (labelled with the position), grouped by fact (`group_batches`' per-fact ids).
    Examples without a prompt (plain sentences) contribute no position."""
    batches, groups = group_batches(examples, tok, batch_size, False)
    at = []
    for b in batches:
        scored = b.targets != -100
        last = scored.int().argmax(1)                      # input index of the prompt's last token
        pos = torch.arange(b.inputs.shape[1])[None].expand_as(scored)
        mask = (pos >= 1) & (pos <= last[:, None]) & scored.any(1, keepdim=True)
        at.append((mask, pos))
    return batches, groups, at


def first_answer_char_positions(examples: Sequence, tok: ByteTokenizer, batch_size: int
                                ) -> tuple[list[Batch], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every example once, with the input position whose query predicts the answer's first
    character (target 0 is the space before the answer), labelled 0."""
    batches, _ = group_batches(examples, tok, batch_size)
    at = []
    for b in batches:
        sc = b.targets != -100
        at.append((sc & ((sc.cumsum(1) - 1) == 1), torch.zeros_like(b.targets)))
    return batches, at
