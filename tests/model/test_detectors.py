"""Detectors (gating.py): flat rows with a cue and a gate in the detector partition, never read,
never in a search's top-k; the side query returns the m best by cos(q, key) + bias, the
same in process and over gRPC; the knowledge layer opens, of the labels whose detectors
share an open gate, the one with the best evidence so far in the sequence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_worker.gating import CUE_TAG, DETECTOR_PARTITION, GATE_TAG, GATE_TAGS, GateState, family_winners
from store_service import errors
from store_service.config import TableConfig
from store_service.interface import SideQuery
from store_service.table import Table
from store_service.testing import served_table


def _store_config(**kw) -> TableConfig:
    return TableConfig(d_k=8, d_v=4, segments=[("product", 8), ("flat", 30)], num_shards=3, seed=1, **kw)


def _with_detectors(table: Table, seed: int = 0):
    """8 rows: 2 plain, 1 cue (label 50), 1 gated (gate 60), 4 detectors (cues 60 / 61 under gate 50)."""
    g = torch.Generator().manual_seed(seed)
    values, keys = torch.randn(8, 4, generator=g), torch.randn(8, 8, generator=g) * 5
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -0.2, 0.1, -0.5])
    cue = torch.tensor([-1, -1, 50, -1, 60, 60, 61, 61])
    gate = torch.tensor([-1, -1, -1, 60, 50, 50, 50, 50])
    ids = table.add_rows(values, keys, bias, tags={CUE_TAG: cue, GATE_TAG: gate},
                         partition=torch.where((cue >= 0) & (gate >= 0), DETECTOR_PARTITION, 0))
    return ids, keys, bias, cue, gate


def _detectors(m: int) -> SideQuery:
    return SideQuery(DETECTOR_PARTITION, m)


def _reference(q, keys, bias, ids, m):
    """The m best detectors (the last 4 rows) by cos(q, key) + bias."""
    s = F.normalize(q, dim=-1) @ keys[4:].T + bias[4:]
    top = s.topk(min(m, 4), dim=1)
    return ids[4:][top.indices], top.values


def test_search_leaves_detectors_out_of_the_top_k_and_returns_them_beside_it(tmp_path):
    table = Table.create(_store_config(), str(tmp_path))
    ids, keys, bias, cue, gate = _with_detectors(table)
    assert table.info().partition_rows == {DETECTOR_PARTITION: 4} and table.info().tag_rows[GATE_TAG] == 5
    res = table.search(keys, 5, tags=GATE_TAGS)  # each row's own key as the query
    assert res.side is None
    assert not bool(torch.isin(res.ids, ids[4:]).any())            # detectors are never in the top-k
    q = torch.cat([keys, torch.randn(6, 8)])
    found = table.search(q, 5, tags=GATE_TAGS, side=_detectors(3)).side
    want_ids, want_scores = _reference(q, keys, bias, ids, 3)
    assert torch.equal(found.ids, want_ids)
    torch.testing.assert_close(found.scores, want_scores)
    by_id = dict(zip(ids.tolist(), zip(cue.tolist(), gate.tolist())))
    assert [[by_id[i] for i in row] for row in found.ids.tolist()] == \
        [[(c, g) for c, g in zip(cr, gr)] for cr, gr in zip(found.tags[CUE_TAG].tolist(), found.tags[GATE_TAG].tolist())]
    # more asked than there are: padded
    wide = table.search(q, 5, tags=GATE_TAGS, side=_detectors(6)).side
    assert bool((wide.ids[:, 4:] == -1).all() and torch.isneginf(wide.scores[:, 4:]).all())
    assert bool((wide.tags[CUE_TAG][:, 4:] == -1).all() and (wide.tags[GATE_TAG][:, 4:] == -1).all())
    # ablated detectors are not returned; a snapshot keeps them detectors
    table.set_ablated(ids[4:5], True)
    assert not bool((table.search(q, 5, side=_detectors(4)).side.ids == ids[4]).any())
    again = Table.open(str(tmp_path), table.snapshot())
    assert again.info().partition_rows == {DETECTOR_PARTITION: 4}


def test_detectors_refused_when_out_of_range(tmp_path):
    table = Table.create(_store_config(), str(tmp_path))
    _with_detectors(table)
    for bad in (-1, 0):
        with pytest.raises(errors.InvalidArgument, match="side.k"):
            table.search(torch.randn(2, 8), 3, side=_detectors(bad))


def test_balancing_leaves_detector_bias_alone(tmp_path):
    table = Table.create(_store_config(bias_step=0.1), str(tmp_path))
    ids, keys, bias, *_ = _with_detectors(table)
    owner = next(s for s in table.shards if s.describe().info.row_start <= int(ids[0]) < s.describe().info.row_end)
    before = owner.state_dict()["flat_bias"].clone()
    table.readout(ids[:1].view(1, 1), torch.ones(1, 1))          # some load, so that the rest are "under-used"
    table.end_step(0)
    after = owner.state_dict()["flat_bias"]
    n = before.numel()
    assert torch.equal(after[n - 4:], before[n - 4:])              # the detectors (the last 4 flat rows)
    assert not torch.equal(after[:n - 4], before[:n - 4])          # the other flat rows moved


def test_remote_detections_match_in_process(tmp_path):
    root = str(tmp_path)
    version = Table.create(_store_config(), root).snapshot()
    local = Table.open(root, version)
    with served_table(root, version, timeout_s=20) as remote:
        a, *_ = _with_detectors(local, seed=4)
        b, keys, *_ = _with_detectors(remote, seed=4)
        assert torch.equal(a, b) and remote.info().partition_rows == {DETECTOR_PARTITION: 4}
        q = torch.cat([keys, torch.randn(9, 8)])
        for m in (1, 4, 7):
            x, y = (t.search(q, 6, tags=GATE_TAGS, side=_detectors(m)) for t in (local, remote))
            assert torch.equal(x.ids, y.ids) and torch.equal(x.side.ids, y.side.ids)
            for t in GATE_TAGS:
                assert torch.equal(x.side.tags[t], y.side.tags[t]), t
            torch.testing.assert_close(x.side.scores, y.side.scores)
        with pytest.raises(errors.InvalidArgument, match="side.k"):
            remote.search(q, 6, side=_detectors(-2))
        assert remote.search(q, 6).side is None


# -- the knowledge layer ------------------------------------------------------------

def test_family_winners():
    inf = float("-inf")
    # labels: 0, 1 (gates); 2, 3 under gate 0; 4 under gate 1; one sequence of 3 positions
    family = torch.tensor([-1, -1, 0, 0, 1])
    is_open = torch.tensor([[[False, True, False, False, False],
                             [True, True, False, False, False],
                             [True, False, False, False, False]]])
    evidence = torch.tensor([[[inf, inf, 0.5, 0.2, 0.1],
                              [inf, inf, 0.5, 0.5, 0.1],          # a tie: both open
                              [inf, inf, 0.1, 0.7, inf]]])
    won = family_winners(is_open, evidence, family)
    assert won[0, :, :2].sum() == 0                               # gates themselves are not detector labels
    assert won[0, 0].tolist() == [False, False, False, False, True]   # gate 0 shut; 4's gate open
    assert won[0, 1].tolist() == [False, False, True, True, True]
    assert won[0, 2].tolist() == [False, False, False, True, False]   # 4 has no evidence (and its gate shut)
    assert not bool(family_winners(is_open, evidence, torch.full((5,), -1)).any())


def _family(kl, table, q, cue_at: int, read_at: int, det_at: tuple[int, int], det_bias: tuple[float, float],
            subject: int = 500):
    """A cue row (label `subject`) that only position cue_at selects; two facts (labels 601,
    602), each with one detector keyed on position det_at[i]'s query (head 0) under gate
    `subject`, and one gated row keyed on position read_at's query. Returns their ids."""
    qc = q[0, cue_at, 0]
    kc = 20 * qc
    others = (q[0].reshape(-1, kl.d_k) @ kc).topk(2).values[1]
    bias_c = -(float(others) + float(qc @ kc)) / 2                    # only cue_at selects the cue
    kr = 20 * q[0, read_at, 0]
    det_keys = [F.normalize(q[0, t, 0], dim=-1) for t in det_at]
    keys = torch.stack([kc, *det_keys, kr, kr])
    bias = torch.tensor([bias_c, *det_bias, 0.0, 0.0])
    cue = torch.tensor([subject, 601, 602, -1, -1])
    gate = torch.tensor([-1, subject, subject, 601, 602])
    ids = table.add_rows(torch.randn(5, table.info().d_v), keys, bias, tags={CUE_TAG: cue, GATE_TAG: gate},
                         partition=torch.tensor([0, DETECTOR_PARTITION, DETECTOR_PARTITION, 0, 0]))
    kl.refresh_table_state()
    return [int(i) for i in ids]


@pytest.mark.parametrize("winner", [0, 1])
def test_the_label_with_the_best_evidence_opens(gate_lab, winner):
    kl, table = gate_lab.layer()
    x = torch.randn(1, 10, kl.wq.in_features)
    q = gate_lab.queries(kl, x)
    # the detectors sit at positions 1 and 5: one before the cue (at 3), one after
    det_bias = (0.0, -1.5) if winner == 0 else (-1.5, 0.0)
    cue_row, d1, d2, r1, r2 = _family(kl, table, q, cue_at=3, read_at=8, det_at=(1, 5), det_bias=det_bias)
    assert table.info().partition_rows == {DETECTOR_PARTITION: 2}
    read = gate_lab.read(kl, x)
    assert not bool(torch.isin(read.ids, torch.tensor([d1, d2])).any())      # detectors are never read
    gates = read.gates                                                       # what the layer's gates did
    assert gates.labels.tolist() == [500, 601, 602]
    assert gates.opened[0, 8].tolist() == [True, winner == 0, winner == 1]
    assert not bool(gates.opened[0, :3].any())
    assert bool(torch.isfinite(gates.evidence[0, 8, 1:]).all()) and bool(torch.isneginf(gates.evidence[0, :, 0]).all())
    read = [gate_lab.selected(kl, x, r) for r in (r1, r2)]
    assert bool(read[winner][8]) and not bool(read[1 - winner].any())
    assert not bool(read[winner][:3].any())                                  # nothing opens before the subject


def test_no_label_opens_without_its_gate(gate_lab):
    kl, table = gate_lab.layer()
    x = torch.randn(1, 10, kl.wq.in_features)
    q = gate_lab.queries(kl, x)
    _, _, _, r1, r2 = _family(kl, table, q, cue_at=3, read_at=8, det_at=(1, 5), det_bias=(0.0, -1.5))
    y = x.clone()
    y[:, 3] = torch.randn(kl.wq.in_features)                  # the subject's cue no longer fires
    for r in (r1, r2):
        assert not bool(gate_lab.selected(kl, y, r).any())


def test_gate_state_with_detectors_carries_across_generation_calls(gate_lab):
    kl, table = gate_lab.layer()
    S = 10
    x = torch.randn(1, S, kl.wq.in_features)
    # the winner's evidence (602, at 3) comes in the first call; at 6, where the rows are read,
    # only the loser's detector (601) scores: the winner's evidence must have been carried
    _, _, _, r1, r2 = _family(kl, table, gate_lab.queries(kl, x), cue_at=1, read_at=6, det_at=(6, 3),
                              det_bias=(-0.5, 0.0))
    state = GateState()
    full, stepwise = gate_lab.full_and_stepwise(kl, x, 5, state)
    assert bool((full[0, 6] == r2).any()) and not bool((full[0, 6] == r1).any())
    assert torch.equal(stepwise, full)
    assert state.labels.tolist() == [500, 601, 602] and state.family.tolist() == [-1, 500, 500]


def test_one_search_per_layer_and_call_brings_tags_and_detectors(gate_lab):
    """The gated table costs no second round trip: one search per call, asking for the cue /
    gate tags and the detector partition's side query."""
    kl, table = gate_lab.layer()
    x = torch.randn(1, 10, kl.wq.in_features)
    _family(kl, table, gate_lab.queries(kl, x), cue_at=3, read_at=8, det_at=(1, 5), det_bias=(0.0, -1.5))
    calls = []
    search = table.search

    def counted(q, k, **kw):
        calls.append(kw)
        return search(q, k, **kw)
    table.search = counted
    gate_lab.read(kl, x)
    assert calls == [{"tags": GATE_TAGS, "side": SideQuery(DETECTOR_PARTITION, kl.cfg.detector_pool),
                      "want_keys": True}]
