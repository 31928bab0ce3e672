"""Cue-gated rows (interface.py, "Cues and gates"): the store keeps each flat row's
cue and gate labels (in process, in Zarr, over gRPC), and the knowledge layer lets
a gated row be selected only at and after a position where its cue fired, also
across the calls of a generation."""
from __future__ import annotations

import pytest
import torch

from model_worker.knowledge_layer import KnowledgeLayer
from model_worker.model import Transformer
from model_worker.train import TrainConfig, create_table, model_config
from store_service import errors
from store_service.config import TableConfig
from store_service.table import Table
from tests.test_grpc_parity import loopback_table

TOKEN = "gates-token"


def _store_config() -> TableConfig:
    return TableConfig(d_k=8, d_v=4, segments=[("product", 8), ("flat", 30)], num_shards=3, seed=1)


def _rows(m: int, d_k: int = 8, d_v: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d_v, generator=g), torch.randn(m, d_k, generator=g) * 5


def _labels_of(table, ids: torch.Tensor, keys: torch.Tensor):
    """Search for each key itself (it wins its own query) -> (top id, its cue, its gate)."""
    res = table.search(keys, 3)
    return res.ids[:, 0], res.cue[:, 0], res.gate[:, 0]


def test_store_keeps_labels_through_search_snapshot_and_reopen(tmp_path):
    table = Table.create(_store_config(), str(tmp_path))
    values, keys = _rows(5)
    cue = torch.tensor([7, -1, -1, 9, -1])
    gate = torch.tensor([-1, 7, 7, -1, 9])
    ids = table.add_rows(values, keys, cue=cue, gate=gate)
    assert table.info().gated_rows == 3
    top, c, g = _labels_of(table, ids, keys)
    assert torch.equal(top, ids) and torch.equal(c, cue) and torch.equal(g, gate)
    # rows without labels (and padding) carry -1
    res = table.search(torch.randn(4, 8), 3)
    old = res.ids < ids.min()
    assert bool((res.cue[old] == -1).all() and (res.gate[old] == -1).all())
    version = table.snapshot()
    again = Table.open(str(tmp_path), version)
    assert again.info().gated_rows == 3
    top, c, g = _labels_of(again, ids, keys)
    assert torch.equal(c, cue) and torch.equal(g, gate)


def test_add_rows_refuses_bad_labels_and_changes_nothing(tmp_path):
    table = Table.create(_store_config(), str(tmp_path))
    n = table.info().num_rows
    values, keys = _rows(3)
    for bad in ({"cue": torch.tensor([0, -2, 1])}, {"gate": torch.tensor([0.0, 1.0, 2.0])},
                {"gate": torch.tensor([0, 1])}):
        with pytest.raises(errors.InvalidArgument):
            table.add_rows(values, keys, **bad)
    assert table.info().num_rows == n and table.info().gated_rows == 0


def test_remote_labels_match_in_process(tmp_path):
    root = str(tmp_path)
    version = Table.create(_store_config(), root).snapshot()
    local = Table.open(root, version)
    with loopback_table(root, version, token=TOKEN, store_root=root, timeout_s=20) as remote:
        values, keys = _rows(6, seed=2)
        cue, gate = torch.tensor([3, -1, -1, 4, -1, -1]), torch.tensor([-1, 3, 4, -1, 3, -1])
        # without labels the wire carries none; the client fills -1
        q = torch.randn(5, 8)
        assert bool((remote.search(q, 4).gate == -1).all())
        a, b = local.add_rows(values, keys, cue=cue, gate=gate), remote.add_rows(values, keys, cue=cue, gate=gate)
        assert torch.equal(a, b)
        assert local.info().gated_rows == remote.info().gated_rows == 3
        for qs in (keys, torch.cat([keys, torch.randn(7, 8)])):
            x, y = local.search(qs, 4), remote.search(qs, 4)
            assert torch.equal(x.ids, y.ids) and torch.equal(x.cue, y.cue) and torch.equal(x.gate, y.gate)
        with pytest.raises(errors.InvalidArgument):
            remote.add_rows(values, keys, cue=torch.full((6,), -3))
        assert remote.info().num_rows == local.info().num_rows


# -- the knowledge layer ------------------------------------------------------------

def _layer(tmp_path):
    cfg = TrainConfig(model="tiny-knowledge", out_dir=str(tmp_path))
    mcfg = model_config(cfg, 260)
    table = create_table(mcfg, cfg, str(tmp_path / "store"))
    torch.manual_seed(0)
    model = Transformer(mcfg, table).eval()
    return model.knowledge_layers()[0], table


def _queries(kl: KnowledgeLayer, x: torch.Tensor) -> torch.Tensor:
    B, S, _ = x.shape
    return kl.q_norm(kl.wq(x).view(B, S, kl.n_heads, kl.d_k)).float().detach()   # [B, S, h, d_k]


def _add_pair(kl, table, q, cue_at: int, gated_at: int, cue_label: int, gate_label: int) -> tuple[int, int]:
    """A cue row that only the query at position cue_at (head 0) selects, and a gated row
    keyed on position gated_at's query (no bias: every position would select it if open)."""
    qc, qg = q[0, cue_at, 0], q[0, gated_at, 0]
    kc, kg = 20 * qc, 20 * qg
    others = (q[0, :, :].reshape(-1, kl.d_k) @ kc).topk(2).values[1]       # best score at another (pos, head)
    bias_c = -(float(others) + float(qc @ kc)) / 2                          # halfway: only cue_at selects it
    values = torch.randn(2, table.info().d_v)
    ids = table.add_rows(values, torch.stack([kc, kg]), torch.tensor([bias_c, 0.0]),
                         cue=torch.tensor([cue_label, -1]), gate=torch.tensor([-1, gate_label]))
    kl.refresh_table_state()
    return int(ids[0]), int(ids[1])


def _selected(kl, x, row: int, **kw) -> torch.Tensor:
    """[S] bool: some head of the position selects `row`."""
    kl.record = True
    kl(x, **kw)
    kl.record = False
    return (kl.last_ids[0] == row).any(-1).any(-1)


@pytest.mark.parametrize("order", ["cue_first", "cue_after", "other_label"])
def test_gated_row_is_selectable_only_from_its_cue_on(tmp_path, order):
    kl, table = _layer(tmp_path)
    S, cue_at, gated_at = 10, 3, 6
    x = torch.randn(1, S, kl.wq.in_features)
    q = _queries(kl, x)
    if order == "cue_after":
        cue_at, gated_at = 8, 6
    cue_row, gated_row = _add_pair(kl, table, q, cue_at, gated_at, 100, 101 if order == "other_label" else 100)
    fired = _selected(kl, x, cue_row)
    assert fired.nonzero().flatten().tolist() == [cue_at]          # the setup: the cue fires there only
    read = _selected(kl, x, gated_row)
    if order == "cue_first":
        assert bool(read[gated_at]) and not bool(read[:cue_at].any())
    else:                                                           # cue later, or a different label: closed
        assert not bool(read[:cue_at].any()) and not bool(read[gated_at])
        if order == "other_label":
            assert not bool(read.any())


def _full_and_stepwise(kl, x: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids the layer selects over x [1, S, D] in one call, and in a generation's calls:
    the first `prompt` positions, then one position at a time."""
    kl.record = True
    kl(x)
    full = kl.last_ids.clone()
    kl(x[:, :prompt], input_pos=torch.arange(prompt))
    parts = [kl.last_ids.clone()]
    for t in range(prompt, x.shape[1]):
        kl(x[:, t:t + 1], input_pos=torch.tensor([t]))
        parts.append(kl.last_ids.clone())
    kl.record = False
    return full, torch.cat(parts, 1)


def test_open_gates_carry_across_generation_calls(tmp_path):
    kl, table = _layer(tmp_path)
    S = 10
    x = torch.randn(1, S, kl.wq.in_features)
    cue_row, gated_row = _add_pair(kl, table, _queries(kl, x), 2, 7, 5, 5)
    full, stepwise = _full_and_stepwise(kl, x, 4)
    assert bool((full == gated_row).any())                          # the gated row is read after the cue
    assert torch.equal(stepwise, full)
    # a fresh generation (position 0) starts with every gate closed again
    kl.record = True
    kl(x[:, 7:8], input_pos=torch.tensor([0]))
    kl.record = False
    assert not bool((kl.last_ids == gated_row).any())
