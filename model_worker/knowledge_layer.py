"""A knowledge layer: h query heads over one shared table (DESIGN.md section 2).

    q      = norm(W_q x)                         query, d_k
    S, I   = top-k over rows i of  q.k_i + b_i   b_i: balancing bias, selection only
    w      = softmax(q.k_I / tau)                recomputed differentiably
    r      = sum_j w_j v_{I_j}                   the readout, d_v
    y      = W_o concat_h(r) * silu(W_g x)       output (gating optional)

Where each piece runs:
- The product segment (rows [0, n_sub^2)) is searched here: its two codebooks
  are parameters of this layer and its per-sub-key balancing biases are buffers.
- Flat segments (rows appended after it) are searched by the store
  (`table.search`), which returns selection scores and the rows' keys.
- Gated flat rows (interface.py: cues and gates) are masked here before the
  merge: a row with gate g is a candidate at position t of a sequence only if a
  row with cue g is in the top-k of position t or an earlier one, that top-k
  taken over the ungated candidates (so a gated row never opens a gate), or if g
  is a detector label that wins its family there: its gate is open and its best
  detector score so far is the family's highest (the store returns the best
  `detector_pool` detectors per query beside the top-k). During generation the
  gate state carries over from one call to the next (reset when a call starts
  at position 0).
- The top-k is merged here, and w is recomputed from q and the selected keys
  so that gradients reach q, the codebooks, and the flat keys (sent to the
  store with `table.accumulate_key_grads`).
- The readout runs on the store (pushdown) or here on fetched rows (fetch), and
  so does its backward. Pushdown moves a [T, d_v] partial readout per shard each
  way (T = tokens x heads); fetch moves the U distinct selected rows, and in
  backward their gradients dL/dv (sent with `accumulate_value_grads`, in the
  background: nothing waits for them until the step barrier); a training fetch
  carries the rows' usage. Fetch wins when U < T: tables small against the
  batch, or heads that agree; "auto" picks per call. Both modes train the same
  (up to fp32 summation order): the store applies the same row gradients at
  `end_step`. A fetch is in flight while `forward(x, beside=ffn)` runs the FFN
  beside the layer (`start` / `finish` split the layer around it).

Only `store_service.kernels` functions and the `KnowledgeTable` protocol are used.
"""
from __future__ import annotations

import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from store_service import kernels
from store_service.interface import SEGMENT_FLAT, SEGMENT_PRODUCT, Detections, KnowledgeTable

from .config import KnowledgeConfig


def _request_id() -> str:
    return uuid.uuid4().hex


class PushdownReadout(torch.autograd.Function):
    """r = table.readout(ids, w); backward: dL/dw = table.readout_backward(ids, w, dL/dr).
    The row gradients stay on the store and are applied at `table.end_step`."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, ids: torch.Tensor, table: KnowledgeTable) -> torch.Tensor:
        # weights [T, k] fp32, ids [T, k] int64 -> [T, d_v] fp32
        w = weights.detach().float().contiguous()
        ctx.table = table
        ctx.save_for_backward(ids, w)
        # A remote store's answer arrives in host memory (decoded from the wire, wherever its
        # shards live); the result joins the model on the worker's device.
        return table.readout(ids, w).to(w.device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids, w = ctx.saved_tensors
        grad_w = ctx.table.readout_backward(ids, w, grad_out.float().contiguous(), request_id=_request_id())
        return grad_w.to(w.device), None, None


def distinct_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (the distinct selected rows [U] sorted, ids as positions in them [T, k], PAD kept)."""
    valid = ids >= 0
    uniq, inverse = torch.unique(ids[valid], return_inverse=True)  # [U], [#valid]
    local = torch.full_like(ids, kernels.PAD_ID)
    local[valid] = inverse
    return uniq, local


def fetch_usage(local: torch.Tensor, w: torch.Tensor, n_rows: int) -> dict[str, torch.Tensor]:
    """A training readout's use of its distinct rows, counted as a pushdown readout counts
    its own: hits [U] (entries with weight > 0) and weight_sum [U] (float64)."""
    valid = local >= 0
    lv, wv = local[valid], w[valid]
    read = lv[wv > 0]
    return {"hits": torch.zeros(n_rows, dtype=torch.int64, device=w.device).index_add_(0, read, torch.ones_like(read)),
            "weight_sum": torch.zeros(n_rows, dtype=torch.float64, device=w.device).index_add_(0, lv, wv.double())}


# Fetches in flight while the caller computes something else (the FFN beside the layer).
_FETCHES = ThreadPoolExecutor(4, thread_name_prefix="knowledge-fetch")


class FetchReadout(torch.autograd.Function):
    """r computed here from the fetched distinct rows with the store's own kernel, and so
    is its backward; the rows' gradients go to the store (in the background)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor, local: torch.Tensor, uniq: torch.Tensor,
                table: KnowledgeTable) -> torch.Tensor:
        # weights [T, k] fp32; values [U, d_v] the fetched rows uniq [U]; local [T, k] from distinct_rows
        w = weights.detach().float().contiguous()
        ctx.table = table
        ctx.save_for_backward(uniq, local, w, values)
        return kernels.readout_weighted(values, local, w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        uniq, local, w, values = ctx.saved_tensors
        grad_w, rows, row_grads = kernels.readout_weighted_backward(values, local, w, grad_out.float().contiguous())
        if rows.numel():
            ctx.table.accumulate_value_grads(uniq[rows], row_grads, request_id=_request_id())
        return grad_w, None, None, None, None


@dataclass
class _OpenGates:
    """The gate state at the end of a generation call, carried into the next: per label,
    whether a cue of it fired (fired [B, G]), its best detector evidence (evidence [B, G])
    and the gate its detectors compete under (family [G], a label, -1 for none)."""
    labels: torch.Tensor
    fired: torch.Tensor
    evidence: torch.Tensor
    family: torch.Tensor


@dataclass
class GateRecord:
    """What a recording layer's gates did on its last call: labels [G] (sorted), opened
    [B, S, G] (label open at that position) and evidence [B, S, G] (a detector label's best
    score so far; -inf for other labels)."""
    labels: torch.Tensor
    opened: torch.Tensor
    evidence: torch.Tensor


@dataclass
class PendingReadout:
    """What `KnowledgeLayer.start` leaves for `finish`: the selection, and in fetch mode the
    fetch of its distinct rows, in flight."""
    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    fetch: Future | None = None
    uniq: torch.Tensor | None = None
    local: torch.Tensor | None = None


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


class KnowledgeLayer(nn.Module):
    def __init__(self, d_model: int, cfg: KnowledgeConfig, table: KnowledgeTable | None = None,
                 init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_k, self.d_v, self.k, self.n = cfg.n_heads, cfg.d_k, cfg.d_v, cfg.k, cfg.n_sub
        self.readout_mode = cfg.readout
        self.wq = nn.Linear(d_model, cfg.n_heads * cfg.d_k, bias=False)
        self.q_norm = nn.RMSNorm(cfg.d_k, eps=1e-5) if cfg.qk_norm else nn.Identity()
        half = cfg.d_k // 2
        self.codebook_a = nn.Parameter(F.normalize(torch.randn(cfg.n_sub, half), dim=-1))
        self.codebook_b = nn.Parameter(F.normalize(torch.randn(cfg.n_sub, half), dim=-1))
        self.wo = nn.Linear(cfg.n_heads * cfg.d_v, d_model, bias=False)
        self.wg = nn.Linear(d_model, d_model, bias=False) if cfg.gate else None
        nn.init.normal_(self.wq.weight, std=d_model ** -0.5)
        nn.init.normal_(self.wo.weight, std=init_std)
        if self.wg is not None:
            nn.init.normal_(self.wg.weight, std=init_std)
        # Per-sub-key balancing biases (selection only; b_{i*n+j} = bias_a[i] + bias_b[j]).
        self.register_buffer("bias_a", torch.zeros(cfg.n_sub))
        self.register_buffer("bias_b", torch.zeros(cfg.n_sub))
        # Sub-key selections since the last update_bias() (training only).
        self.register_buffer("load_a", torch.zeros(cfg.n_sub), persistent=False)
        self.register_buffer("load_b", torch.zeros(cfg.n_sub), persistent=False)
        self.table: KnowledgeTable | None = None
        self._ablated: torch.Tensor | None = None  # [n^2] bool, None when nothing is ablated
        self._has_flat = False
        self._gated = False        # the table has gated rows
        self._detectors = False    # ... and detectors among them
        self._num_rows = 0
        self._open: _OpenGates | None = None  # generation: the gate state after the last call
        self.record = False  # keep the last ids / weights (interpretability)
        self.last_ids: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_gates: GateRecord | None = None   # with record, when the table has gated rows
        if table is not None:
            self.attach(table)

    # -- the table ---------------------------------------------------------
    def attach(self, table: KnowledgeTable) -> None:
        info = table.info()
        seg0 = info.segments[0]
        if seg0.kind != SEGMENT_PRODUCT or seg0.row_start != 0 or seg0.n_sub != self.n:
            raise ValueError(f"table must start with a product segment of n_sub={self.n} at row 0; got {seg0}")
        if (info.d_k, info.d_v) != (self.d_k, self.d_v):
            raise ValueError(f"table dims (d_k={info.d_k}, d_v={info.d_v}) != layer ({self.d_k}, {self.d_v})")
        self.table = table
        self.refresh_table_state()

    def refresh_table_state(self) -> None:
        """Re-read what the layer caches about its table: whether flat segments
        exist, and which product rows are ablated. Call after add_rows /
        set_ablated / load_version."""
        info = self.table.info()
        self._has_flat = any(s.kind == SEGMENT_FLAT and s.num_rows > 0 for s in info.segments)
        self._gated = info.gated_rows > 0
        self._detectors = info.detector_rows > 0
        self._num_rows = info.num_rows
        ablated = self.table.usage().ablated[: self.n * self.n].to(torch.bool)
        self._ablated = ablated if bool(ablated.any()) else None

    # -- forward -----------------------------------------------------------
    def codebooks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.qk_norm:
            return F.normalize(self.codebook_a, dim=-1), F.normalize(self.codebook_b, dim=-1)
        return self.codebook_a, self.codebook_b

    def forward(self, x: torch.Tensor, beside: nn.Module | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, D] -> [B, S, D]. beside: a module on the same input (the FFN beside this
        layer), run while a fetch-mode readout's rows are in flight; its output is added
        (beside(x) + layer(x)). input_pos [S]: generation with caches (gates opened by
        earlier calls stay open)."""
        p = self.start(x, input_pos)
        f = beside(x) if beside is not None else None
        y = self.finish(p)
        return y if f is None else f + y

    def start(self, x: torch.Tensor, input_pos: torch.Tensor | None = None) -> PendingReadout:
        """Everything up to the readout; in fetch mode the fetch of the selected rows is
        then in flight, so that the caller can compute something else meanwhile (`finish`
        waits for it). forward(x) == finish(start(x))."""
        B, S, D = x.shape
        h, k, n = self.n_heads, self.k, self.n
        q = self.q_norm(self.wq(x).view(B * S * h, self.d_k)).float()   # [T, d_k], T = B*S*h
        ca, cb = self.codebooks()                                          # [n, d_k/2] each

        self.last_gates = None
        ids, flat_keys = self._select(q.detach(), ca.detach(), cb.detach(), (B, S), input_pos)  # [T, k], [T, k, d_k]

        # Recompute the scores of the selected rows differentiably (no bias). A product
        # key is (c_a[i], c_b[j]), so q.k = (q_a C_a^T)[i] + (q_b C_b^T)[j]: gather from the
        # [T, n] sub-scores (a cheap scatter in backward) instead of gathering keys.
        half = self.d_k // 2
        is_prod = (ids >= 0) & (ids < n * n)
        pid = ids.clamp(0, n * n - 1)
        sa, sb = q[:, :half] @ ca.T, q[:, half:] @ cb.T                     # [T, n] each
        scores = sa.gather(1, pid // n) + sb.gather(1, pid % n)            # [T, k]
        if flat_keys is not None:
            flat = torch.einsum("td,tkd->tk", q, self._store_keys(flat_keys, ids, is_prod))
            scores = torch.where(is_prod, scores, flat)
        w = kernels.masked_softmax(scores / self.cfg.tau, ids)            # [T, k]

        if self.training:
            self.load_a += torch.bincount(pid[is_prod] // n, minlength=n).to(self.load_a.dtype)
            self.load_b += torch.bincount(pid[is_prod] % n, minlength=n).to(self.load_b.dtype)
        if self.record:
            self.last_ids = ids.view(B, S, h, k)
            self.last_weights = w.detach().view(B, S, h, k)
        return self._start_readout(PendingReadout(x, ids, w))

    def _start_readout(self, p: PendingReadout) -> PendingReadout:
        if self.readout_mode == "pushdown":
            return p
        uniq, local = distinct_rows(p.ids)
        if uniq.numel() == 0 or (self.readout_mode == "auto" and uniq.numel() > p.ids.shape[0]):
            return p   # more distinct rows than readouts: pushdown moves fewer bytes
        # A training forward counts its rows' use (as a pushdown readout does, and the
        # balancing needs it); evaluation and generation read by fetch to leave usage alone.
        usage = fetch_usage(local, p.w.detach(), uniq.numel()) if self.training else {}
        # The fetch gets host copies (taken now, while the device has little queued): its
        # thread then never waits on the device, whose queue the caller is about to fill.
        host = {k: t.cpu() for k, t in usage.items()}
        p.uniq, p.local = uniq, local
        p.fetch = _FETCHES.submit(self.table.fetch, uniq.cpu(), **host)
        return p

    def finish(self, p: PendingReadout) -> torch.Tensor:
        B, S, D = p.x.shape
        if p.fetch is None:
            r = PushdownReadout.apply(p.w, p.ids, self.table)                  # [T, d_v] fp32
        else:
            values = p.fetch.result().to(p.w.device)                           # [U, d_v]
            r = FetchReadout.apply(p.w, values, p.local, p.uniq, self.table)
        y = self.wo(r.to(p.x.dtype).view(B, S, self.n_heads * self.d_v))      # [B, S, D]
        if self.wg is not None:
            y = y * F.silu(self.wg(p.x))
        return y

    @torch.no_grad()
    def _select(self, q: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, shape: tuple[int, int] | None = None,
                input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-k over all segments by q.k_i + b_i -> ids [T, k] and, when flat
        segments exist, the flat keys of the selection [T, k, d_k] (0 elsewhere).
        shape = (B, S) of the tokens behind q's T = B*S*h rows (needed for gates)."""
        half = self.d_k // 2
        scores, ids = kernels.product_key_search(q[:, :half], q[:, half:], ca, cb, self.k,
                                                 self.bias_a, self.bias_b, self._ablated)
        if not self._has_flat:
            return ids, None
        gated = self._gated and shape is not None
        if gated:
            res = self.table.search(q, min(self.k * self.cfg.gate_pool, self._num_rows),
                                    detectors=self.cfg.detector_pool if self._detectors else 0)
        else:
            res = self.table.search(q, self.k)
        flat_scores = res.scores.to(scores.device)
        if gated and res.gate is not None:
            found = res.detectors.to(ids.device) if res.detectors is not None else None
            flat_scores = self._close_gates(scores, flat_scores, res.cue.to(ids.device), res.gate.to(ids.device),
                                            found, shape, input_pos)
        scores = torch.cat([scores, flat_scores], dim=1)                   # [T, k + flat candidates]
        ids = torch.cat([ids, res.ids.to(ids.device)], dim=1)
        keys = torch.cat([res.keys.new_zeros(res.keys.shape[0], self.k, self.d_k), res.keys], dim=1).to(q.device)
        top = scores.topk(self.k, dim=1).indices
        ids = ids.gather(1, top).masked_fill(torch.isneginf(scores.gather(1, top)), kernels.PAD_ID)
        return ids, keys.gather(1, top.unsqueeze(-1).expand(-1, -1, self.d_k))

    def _close_gates(self, prod_scores: torch.Tensor, scores: torch.Tensor, cue: torch.Tensor, gate: torch.Tensor,
                     found: Detections | None, shape: tuple[int, int], input_pos: torch.Tensor | None
                     ) -> torch.Tensor:
        """Flat candidates' scores [T, C] with -inf where the row's gate is closed at its
        position (interface.py: cues and gates, detectors)."""
        B, S = shape
        h, k, dev = self.n_heads, self.k, scores.device
        is_gated = gate >= 0
        # the cues that fire: labels of the cue rows in the top-k over ungated candidates
        cand = torch.cat([prod_scores, scores.masked_fill(is_gated, float("-inf"))], 1)
        cues = torch.cat([torch.full_like(prod_scores, -1, dtype=torch.int64), cue], 1)
        s, top = cand.topk(k, dim=1)
        fired = cues.gather(1, top).masked_fill(torch.isneginf(s), -1)                  # [T, k]
        carry = self._open if input_pos is not None and int(input_pos[0]) > 0 else None
        if carry is not None and carry.fired.shape[0] != B:
            carry = None
        det = found is not None and bool((found.cue >= 0).any())
        parts = [fired[fired >= 0], gate[is_gated]]
        if det:
            parts += [found.cue[found.cue >= 0], found.gate[found.gate >= 0]]
        if carry is not None:
            parts += [carry.labels.to(dev), carry.family[carry.family >= 0].to(dev)]
        labels = torch.unique(torch.cat(parts))                                          # [G] sorted
        G = labels.numel()
        if G == 0:
            self._open = None
            if self.record:
                none = torch.zeros(B, S, 0, device=dev)
                self.last_gates = GateRecord(labels, none.bool(), none)
            return scores
        tok = torch.arange(B * S * h, device=dev) // h                                   # row -> token b*S + s
        col = lambda lab: torch.searchsorted(labels, lab)                               # noqa: E731 - label -> column
        is_open = torch.zeros(B * S, G, dtype=torch.bool, device=dev)
        hit = fired >= 0
        is_open[tok[:, None].expand_as(fired)[hit], col(fired[hit])] = True
        is_open = is_open.view(B, S, G).int().cummax(1).values.bool()                   # open from where it fired on
        evidence = torch.full((B, S, G), float("-inf"), device=dev)
        family = torch.full((G,), -1, dtype=torch.int64, device=dev)                    # detector label -> its gate's column
        if det:
            hit = found.cue >= 0
            rows = tok[:, None].expand_as(found.cue)[hit]
            evidence.view(-1).scatter_reduce_(0, rows * G + col(found.cue[hit]), found.scores[hit].float(), "amax")
            evidence = evidence.cummax(1).values                                         # the best so far in the sequence
            family[col(found.cue[hit])] = col(found.gate[hit])
        if carry is not None:
            was = col(carry.labels.to(dev))                                              # every carried label is in labels
            prev = torch.zeros(B, G, dtype=torch.bool, device=dev)
            prev[:, was] = carry.fired.to(dev)
            is_open |= prev[:, None]
            prev_ev = torch.full((B, G), float("-inf"), device=dev)
            prev_ev[:, was] = carry.evidence.to(dev)
            evidence = torch.maximum(evidence, prev_ev[:, None])
            known = carry.family.to(dev) >= 0
            family[was[known]] = col(carry.family.to(dev)[known])
        self._open = _OpenGates(labels, is_open[:, -1], evidence[:, -1], torch.where(
            family >= 0, labels[family.clamp_min(0)], -1)) if input_pos is not None else None
        opened = is_open | family_winners(is_open, evidence, family)
        if self.record:
            self.last_gates = GateRecord(labels, opened, evidence)
        gi = col(gate.clamp_min(0)).clamp_max(G - 1)
        ok = opened.view(B * S, G)[tok[:, None].expand_as(gate), gi] & (labels[gi] == gate)
        return scores.masked_fill(is_gated & ~ok, float("-inf"))

    def _store_keys(self, flat_keys: torch.Tensor, ids: torch.Tensor, is_prod: torch.Tensor) -> torch.Tensor:
        """The flat keys as a leaf whose gradient is sent to the store in backward."""
        keys = flat_keys.clone().requires_grad_(torch.is_grad_enabled())
        if keys.requires_grad:
            table = self.table

            def send(grad: torch.Tensor) -> None:
                is_flat = (ids >= 0) & ~is_prod
                uniq, g = kernels.compact_row_grads(ids.masked_fill(~is_flat, kernels.PAD_ID), grad)
                if uniq.numel():
                    table.accumulate_key_grads(uniq, g, request_id=_request_id())
            keys.register_hook(send)
        return keys

    # -- balancing ---------------------------------------------------------
    @torch.no_grad()
    def update_bias(self) -> None:
        """After a step: each sub-key bias moves by a fixed amount against the
        sign of its load error (the store does the same for flat rows)."""
        rate = self.cfg.bias_update_rate
        for load, bias in ((self.load_a, self.bias_a), (self.load_b, self.bias_b)):
            if rate > 0 and load.sum() > 0:
                bias += rate * torch.sign(load.mean() - load)
            load.zero_()
