"""Links (gating.py): detectors with a cue and no gate, each `after` its chain's previous
label; a label holds where its score is positive and its predecessor held at the position
before, so a chain's last label opens only where its tokens occur in order. `learn` keys a
chain on each subject's last tokens (links.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_worker.data import ByteTokenizer
from model_worker.gating import AFTER_TAG, CUE_TAG, DETECTOR_PARTITION, GATE_TAG, GateState
from model_worker.learn import LearnConfig, TextFact, learn
from model_worker.learn.links import _closest_negative
from model_worker.reading import recording

CHAIN = (70, 71, 72)          # labels of a 3-token chain, in token order
AT = (4, 5, 6)                # the positions whose queries (head 0) the links are keyed on


def _chain(kl, table, q, read_at: int = 9):
    """Three links keyed on the queries at AT (each holds only on its own query: bias -0.9 on a
    unit key), chained 70 -> 71 -> 72, and a row gated on 72 keyed on position read_at's query.
    Returns the gated row's id."""
    keys = torch.stack([F.normalize(q[0, t, 0], dim=-1) for t in AT] + [20 * q[0, read_at, 0]])
    cue = torch.tensor([*CHAIN, -1])
    gate = torch.tensor([-1, -1, -1, CHAIN[-1]])
    after = torch.tensor([-1, CHAIN[0], CHAIN[1], -1])
    ids = table.add_rows(torch.randn(4, table.info().d_v), keys, torch.tensor([-0.9, -0.9, -0.9, 0.0]),
                         tags={CUE_TAG: cue, GATE_TAG: gate, AFTER_TAG: after},
                         partition=torch.tensor([DETECTOR_PARTITION] * 3 + [0]))
    kl.refresh_table_state()
    return int(ids[-1])


def test_the_chains_end_opens_where_its_tokens_occur_in_order(gate_lab):
    kl, table = gate_lab.layer()
    x = torch.randn(1, 12, kl.wq.in_features)
    q = gate_lab.queries(kl, x)
    assert float((F.normalize(q[0].reshape(-1, kl.d_k), dim=-1) @ F.normalize(q[0, AT[0], 0], dim=-1)).topk(2)
                 .values[1]) < 0.9                                    # the setup: a link holds on its own query only
    row = _chain(kl, table, q)
    read = gate_lab.read(kl, x)
    opened = read.gates.opened[0, :, read.gates.labels.tolist().index(CHAIN[-1])]
    assert opened.nonzero().flatten().tolist() == list(range(AT[-1], 12))     # from the last token on
    assert bool(gate_lab.selected(kl, x, row)[9])
    assert not bool(torch.isin(read.ids, table.info().num_rows - 4 + torch.arange(3)).any())   # links: never read


@pytest.mark.parametrize("change", ["swapped", "last_only", "gap"])
def test_the_chains_end_stays_shut_without_its_tokens_in_order(gate_lab, change):
    kl, table = gate_lab.layer()
    x = torch.randn(1, 12, kl.wq.in_features)
    row = _chain(kl, table, gate_lab.queries(kl, x))
    y = x.clone()
    if change == "swapped":                       # the first two tokens in the other order
        y[:, [AT[0], AT[1]]] = x[:, [AT[1], AT[0]]]
    elif change == "last_only":                   # only the last token (what one cue row would fire on)
        y[:, [AT[0], AT[1]]] = torch.randn(2, kl.wq.in_features)
    else:                                         # another token between the second and the last
        y = torch.cat([x[:, :AT[2]], torch.randn(1, 1, kl.wq.in_features), x[:, AT[2]:-1]], 1)
    read = gate_lab.read(kl, y)
    assert CHAIN[-1] not in read.gates.labels[read.gates.opened[0].any(0)].tolist()
    assert not bool(gate_lab.selected(kl, y, row).any())


@pytest.mark.parametrize("prompt", [5, 6, 7])
def test_a_chain_carries_across_generation_calls(gate_lab, prompt):
    """Split inside the chain (5: after its first two tokens), at its end, or after it: decoding
    one token at a time selects what one forward over the whole sequence does."""
    kl, table = gate_lab.layer()
    x = torch.randn(1, 12, kl.wq.in_features)
    row = _chain(kl, table, gate_lab.queries(kl, x))
    state = GateState()
    full, stepwise = gate_lab.full_and_stepwise(kl, x, prompt, state)
    assert bool((full[0, 9] == row).any()) and torch.equal(stepwise, full)
    assert state.held is not None and state.held.shape == state.fired.shape


def test_closest_negative_is_the_best_cosine_with_any_query_but_the_subjects_own():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    subj = torch.tensor([0, 0, 1, 1, 2])
    q = torch.randn(7, 2, 8, generator=g)                      # 7 prompt positions, 2 heads
    owner = torch.tensor([0, -1, 1, 1, -1, 2, 0])              # the subject whose name the position is in
    bg = torch.randn(11, 2, 8, generator=g)
    theta = _closest_negative(u, subj, (q, owner), bg, chunk=2)
    nq, nb = F.normalize(q, dim=-1), F.normalize(bg, dim=-1)
    for r in range(5):
        negs = [nq[i, h] for i in range(7) for h in range(2) if owner[i] != subj[r]] + list(nb.reshape(-1, 8))
        assert float(theta[r]) == pytest.approx(float((torch.stack(negs) @ u[r]).max()), abs=1e-6)
    assert torch.equal(_closest_negative(u, subj, None, None), torch.full((5,), -1.0))


FACTS = [TextFact(f"The capital of {s} is", f" {a}.", a, "capital_of", s)
         for s, a in [("Xland", "Zorp"), ("Quux", "Blip")]]


def test_learn_opens_a_subjects_gate_at_its_name_and_nowhere_else(tiny_knowledge):
    """Taught on a tiny random model (whose queries are little more than their byte), each
    subject's chain end opens at the last letter of its name in its prompt, and on no position of
    a prompt naming another subject that shares the relation's words and letters."""
    model, table = tiny_knowledge()
    tok = ByteTokenizer()
    res = learn(model, table, FACTS, tok, LearnConfig(steps=2, batch_size=2), publish=False)
    ends = {v.removeprefix("subject "): int(k) for k, v in res.info["labels"].items()
            if v.startswith("subject ") and "token" not in v}
    assert set(ends) == {"Xland", "Quux"}

    def opened(prompt: str) -> dict[str, list[int]]:
        with recording(model) as trace:
            model(torch.tensor([tok.encode(prompt, bos=True)]))
            g = next(iter(trace.take().values())).gates
        return {s: g.opened[0, :, g.labels.tolist().index(lab)].nonzero().flatten().tolist()
                if lab in g.labels.tolist() else [] for s, lab in ends.items()}
    n = len(tok.encode("The capital of Xland", bos=True))
    assert opened("The capital of Xland is") == {"Xland": list(range(n - 1, n + 3)), "Quux": []}
    assert opened("The capital of Xdlan is") == {"Xland": [], "Quux": []}      # its letters, another order
    assert opened("The capital of Quux is")["Xland"] == []
