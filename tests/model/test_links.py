"""Links (gating.py): detectors with a cue and no gate, each `after` its chain's previous
label; a label holds where its score is positive and its predecessor held at the position
before, so a chain's last label opens only where its tokens occur in order."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_worker.gating import AFTER_TAG, CUE_TAG, DETECTOR_PARTITION, GATE_TAG, GateState

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
