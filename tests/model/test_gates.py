"""Cue-gated rows (gating.py): the store keeps each flat row's "cue" and "gate" tags (in
process, in Zarr, over gRPC), and the knowledge layer lets a gated row be selected only
at and after a position where its cue fired, also across the calls of a generation
(GateState, carried like a KV cache)."""
from __future__ import annotations

import pytest
import torch

from model_worker.gating import CUE_TAG, GATE_TAG, GATE_TAGS, GateState
from model_worker.generate import generate
from store_service import errors
from store_service.config import TableConfig
from store_service.table import Table
from store_service.testing import served_table


def _store_config() -> TableConfig:
    return TableConfig(d_k=8, d_v=4, segments=[("product", 8), ("flat", 30)], num_shards=3, seed=1)


def _rows(m: int, d_k: int = 8, d_v: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d_v, generator=g), torch.randn(m, d_k, generator=g) * 5


def _labels_of(table, ids: torch.Tensor, keys: torch.Tensor):
    """Search for each key itself (it wins its own query) -> (top id, its cue, its gate)."""
    res = table.search(keys, 3, tags=GATE_TAGS)
    return res.ids[:, 0], res.tags[CUE_TAG][:, 0], res.tags[GATE_TAG][:, 0]


def test_store_keeps_labels_through_search_snapshot_and_reopen(tmp_path):
    table = Table.create(_store_config(), str(tmp_path))
    values, keys = _rows(5)
    cue = torch.tensor([7, -1, -1, 9, -1])
    gate = torch.tensor([-1, 7, 7, -1, 9])
    ids = table.add_rows(values, keys, tags={CUE_TAG: cue, GATE_TAG: gate})
    assert table.info().tag_rows[GATE_TAG] == 3
    top, c, g = _labels_of(table, ids, keys)
    assert torch.equal(top, ids) and torch.equal(c, cue) and torch.equal(g, gate)
    # rows without labels (and padding) carry -1
    res = table.search(torch.randn(4, 8), 3, tags=GATE_TAGS)
    old = res.ids < ids.min()
    assert bool((res.tags[CUE_TAG][old] == -1).all() and (res.tags[GATE_TAG][old] == -1).all())
    version = table.snapshot()
    again = Table.open(str(tmp_path), version)
    assert again.info().tag_rows[GATE_TAG] == 3
    top, c, g = _labels_of(again, ids, keys)
    assert torch.equal(c, cue) and torch.equal(g, gate)


def test_add_rows_refuses_bad_labels_and_changes_nothing(tmp_path):
    table = Table.create(_store_config(), str(tmp_path))
    n = table.info().num_rows
    values, keys = _rows(3)
    for bad in ({CUE_TAG: torch.tensor([0, -2, 1])}, {GATE_TAG: torch.tensor([0.0, 1.0, 2.0])},
                {GATE_TAG: torch.tensor([0, 1])}):
        with pytest.raises(errors.InvalidArgument):
            table.add_rows(values, keys, tags=bad)
    assert table.info().num_rows == n and table.info().tag_rows.get(GATE_TAG, 0) == 0


def test_remote_labels_match_in_process(tmp_path):
    root = str(tmp_path)
    version = Table.create(_store_config(), root).snapshot()
    local = Table.open(root, version)
    with served_table(root, version, timeout_s=20) as remote:
        values, keys = _rows(6, seed=2)
        tags = {CUE_TAG: torch.tensor([3, -1, -1, 4, -1, -1]), GATE_TAG: torch.tensor([-1, 3, 4, -1, 3, -1])}
        # before any row has labels, every row's are unset
        q = torch.randn(5, 8)
        assert bool((remote.search(q, 4, tags=GATE_TAGS).tags[GATE_TAG] == -1).all())
        a, b = local.add_rows(values, keys, tags=tags), remote.add_rows(values, keys, tags=tags)
        assert torch.equal(a, b)
        assert local.info().tag_rows[GATE_TAG] == remote.info().tag_rows[GATE_TAG] == 3
        for qs in (keys, torch.cat([keys, torch.randn(7, 8)])):
            x, y = local.search(qs, 4, tags=GATE_TAGS), remote.search(qs, 4, tags=GATE_TAGS)
            assert torch.equal(x.ids, y.ids)
            assert all(torch.equal(x.tags[t], y.tags[t]) for t in GATE_TAGS)
        with pytest.raises(errors.InvalidArgument):
            remote.add_rows(values, keys, tags={CUE_TAG: torch.full((6,), -3)})
        assert remote.info().num_rows == local.info().num_rows


# -- the knowledge layer ------------------------------------------------------------

def _add_pair(kl, table, q, cue_at: int, gated_at: int, cue_label: int, gate_label: int) -> tuple[int, int]:
    """A cue row that only the query at position cue_at (head 0) selects, and a gated row
    keyed on position gated_at's query (no bias: every position would select it if open)."""
    qc, qg = q[0, cue_at, 0], q[0, gated_at, 0]
    kc, kg = 20 * qc, 20 * qg
    others = (q[0, :, :].reshape(-1, kl.d_k) @ kc).topk(2).values[1]       # best score at another (pos, head)
    bias_c = -(float(others) + float(qc @ kc)) / 2                          # halfway: only cue_at selects it
    values = torch.randn(2, table.info().d_v)
    ids = table.add_rows(values, torch.stack([kc, kg]), torch.tensor([bias_c, 0.0]),
                         tags={CUE_TAG: torch.tensor([cue_label, -1]), GATE_TAG: torch.tensor([-1, gate_label])})
    kl.refresh_table_state()
    return int(ids[0]), int(ids[1])


@pytest.mark.parametrize("order", ["cue_first", "cue_after", "other_label"])
def test_gated_row_is_selectable_only_from_its_cue_on(gate_lab, order):
    kl, table = gate_lab.layer()
    S, cue_at, gated_at = 10, 3, 6
    x = torch.randn(1, S, kl.wq.in_features)
    q = gate_lab.queries(kl, x)
    if order == "cue_after":
        cue_at, gated_at = 8, 6
    cue_row, gated_row = _add_pair(kl, table, q, cue_at, gated_at, 100, 101 if order == "other_label" else 100)
    fired = gate_lab.selected(kl, x, cue_row)
    assert fired.nonzero().flatten().tolist() == [cue_at]          # the setup: the cue fires there only
    read = gate_lab.selected(kl, x, gated_row)
    if order == "cue_first":
        assert bool(read[gated_at]) and not bool(read[:cue_at].any())
    else:                                                           # cue later, or a different label: closed
        assert not bool(read[:cue_at].any()) and not bool(read[gated_at])
        if order == "other_label":
            assert not bool(read.any())


def test_open_gates_carry_across_generation_calls(gate_lab):
    kl, table = gate_lab.layer()
    S = 10
    x = torch.randn(1, S, kl.wq.in_features)
    cue_row, gated_row = _add_pair(kl, table, gate_lab.queries(kl, x), 2, 7, 5, 5)
    state = GateState()
    full, stepwise = gate_lab.full_and_stepwise(kl, x, 4, state)
    assert bool((full == gated_row).any())                          # the gated row is read after the cue
    assert torch.equal(stepwise, full)
    assert state.labels.tolist() == [5] and bool(state.fired.all())  # what the next call would continue from
    # a fresh generation (position 0) starts with every gate closed again
    read = gate_lab.read(kl, x[:, 7:8], input_pos=torch.tensor([0]), gates=state)
    assert not bool((read.ids == gated_row).any())
    # without a state each call starts afresh
    read = gate_lab.read(kl, x[:, 7:8], input_pos=torch.tensor([7]))
    assert not bool((read.ids == gated_row).any())


def test_model_generation_carries_gate_states_like_a_full_forward(gate_lab):
    """Through the model: setup_caches gives each knowledge block a GateState, decoding one
    token at a time reads what one forward over the sequence reads, generation gives the
    full forward's tokens, and clear_caches drops the states."""
    model, table = gate_lab.model()
    kl = model.knowledge_layers()[0]
    S, P = 10, 4
    idx = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(3))
    seen = {}
    hook = kl.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(idx)
    hook.remove()
    cue_row, gated_row = _add_pair(kl, table, gate_lab.queries(kl, seen["x"]), 2, 7, 5, 5)
    model.refresh_table_state()
    (layer,) = model.cfg.knowledge.layers
    with torch.no_grad():
        with model.reading(record=True) as full:
            want = model(idx)[0]
        model.setup_caches(1, S)
        assert set(model.gate_states) == {layer} and model.gate_states[layer].is_empty
        with model.reading(record=True) as steps:
            got = [model(idx[:, :P], input_pos=torch.arange(P))[0]]
            got += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(P, S)]
        assert model.gate_states[layer].labels.tolist() == [5]
        model.clear_caches()
    assert model.gate_states is None
    ids = full.last()[layer].ids
    assert bool((ids[0, 7] == gated_row).any()) and not bool((ids[0, :2] == gated_row).any())
    assert torch.equal(steps.rows(layer)[0], ids)
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-4, atol=1e-5)
    # generation: the tokens of the slow way (a full forward over the growing sequence)
    gen = generate(model, idx[:, :P], 5, record=True)
    seq = idx[:, :P]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1)[:, None]], 1)
    assert torch.equal(gen.tokens, seq[:, P:])
    assert len(gen.gates[layer]) == 5 and gen.gates[layer][0].labels.tolist() == [5]
