"""A knowledge layer: h query heads over one shared table (DESIGN.md section 2).

    q      = norm(W_q x)                         query, d_k
    S, I   = top-k over rows i of  q.k_i + b_i   b_i: balancing bias, selection only
    w      = softmax(q.k_I / tau)                recomputed differentiably
    r      = sum_j w_j v_{I_j}                   the readout, d_v
    y      = W_o concat_h(r) * silu(W_g x)       output (the output gate is optional)

Where each piece runs:
- The product segment (rows [0, n_sub^2)) is searched here: its two codebooks
  are parameters of this layer and its per-sub-key balancing biases are buffers.
- Flat segments (rows appended after it) are searched by the store
  (`table.search`), which returns selection scores and the rows' keys; on a table
  with gated rows the same search returns their cue / gate / after tags and the best
  detectors, and gating.py closes the rows whose gate is shut.
- The top-k is merged here, and w is recomputed from q and the selected keys
  so that gradients reach q, the codebooks, and the flat keys (sent to the
  store with `table.accumulate_key_grads`).
- The readout runs on the store (pushdown) or here on fetched rows (fetch), and
  so does its backward (readout.py). A fetch is in flight while
  `forward(x, beside=ffn)` runs the FFN beside the layer.

Per call (the model's `reading` passes them down): `options` (k, readout mode),
`gates` (a generation's GateState, carried from call to call) and `on_read` (called
with what the layer read). Only `store_service.kernels` functions and the
`KnowledgeTable` protocol are used.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from store_service import kernels
from store_service.interface import SEGMENT_FLAT, SEGMENT_PRODUCT, KnowledgeTable, SideQuery

from . import gating
from .config import KnowledgeConfig
from .gating import GateRecord, GateState
from .readout import finish_readout, request_id, start_readout
from .reading import LayerRead, ReadOptions


class KnowledgeLayer(nn.Module):
    def __init__(self, d_model: int, cfg: KnowledgeConfig, table: KnowledgeTable | None = None,
                 init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_k, self.d_v, self.k, self.n = cfg.n_heads, cfg.d_k, cfg.d_v, cfg.k, cfg.n_sub
        self.wq = nn.Linear(d_model, cfg.n_heads * cfg.d_k, bias=False)
        self.q_norm = nn.RMSNorm(cfg.d_k, eps=1e-5) if cfg.qk_norm else nn.Identity()
        half = cfg.d_k // 2
        self.codebook_a = nn.Parameter(F.normalize(torch.randn(cfg.n_sub, half), dim=-1))
        self.codebook_b = nn.Parameter(F.normalize(torch.randn(cfg.n_sub, half), dim=-1))
        self.wo = nn.Linear(cfg.n_heads * cfg.d_v, d_model, bias=False)
        self.wg = nn.Linear(d_model, d_model, bias=False) if cfg.output_gate else None
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
        # What the layer knows of its table (refresh_table_state):
        self._ablated: torch.Tensor | None = None  # [n^2] bool, None when no product row is ablated
        self._has_flat = False
        self._gated = False        # the table has gated rows
        self._detectors = False    # ... and detectors
        self._num_rows = 0
        # The fetches of fetch-mode readouts run on this layer's own thread (made on first
        # use), so that one is in flight while the caller computes; it ends with the layer.
        self._fetcher: ThreadPoolExecutor | None = None
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
        exist, which product rows are ablated, whether rows are gated. Call after
        add_rows / set_ablated / load_version."""
        info = self.table.info()
        self._has_flat = any(s.kind == SEGMENT_FLAT and s.num_rows > 0 for s in info.segments)
        self._gated = info.tag_rows.get(gating.GATE_TAG, 0) > 0
        self._detectors = info.partition_rows.get(gating.DETECTOR_PARTITION, 0) > 0
        self._num_rows = info.num_rows
        ablated = self.table.usage().ablated[: self.n * self.n].to(torch.bool)
        self._ablated = ablated if bool(ablated.any()) else None

    @property
    def has_flat_rows(self) -> bool:
        """Whether the table has flat rows (their keys live on the store, not in this layer)."""
        return self._has_flat

    def close(self) -> None:
        """Stop the fetch thread (a later fetch-mode call starts a new one)."""
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True)
            self._fetcher = None

    def __getstate__(self):
        return {**self.__dict__, "_fetcher": None}   # a thread pool does not travel

    def _fetch_thread(self) -> ThreadPoolExecutor:
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="knowledge-fetch")
            weakref.finalize(self, self._fetcher.shutdown, wait=False)
        return self._fetcher

    # -- forward -----------------------------------------------------------
    def forward(self, x: torch.Tensor, beside: nn.Module | None = None, *, input_pos: torch.Tensor | None = None,
                options: ReadOptions = ReadOptions(), gates: GateState | None = None,
                on_read: Callable[[LayerRead], None] | None = None) -> torch.Tensor:
        """x: [B, S, D] -> [B, S, D]. beside: a module on the same input (the FFN beside this
        layer), run while a fetch-mode readout's rows are in flight; its output is added
        (beside(x) + layer(x)). input_pos [S] and gates: generation with caches (the gates
        opened by earlier calls stay open). on_read: given what this call read."""
        B, S, _ = x.shape
        k = options.k or self.k
        q = self.query(x)                                                    # [T, d_k], T = B*S*h
        ca, cb = self.codebooks()                                            # [n, d_k/2] each
        # (_select runs without grad: only q, which goes to the table, is detached)
        ids, flat_keys, gate_record = self._select(q.detach(), ca, cb, k, (B, S), input_pos, gates)  # [T, k], [T, k, d_k]
        parts = self._product_parts(ids)
        w = self._weights(q, ca, cb, ids, flat_keys, parts)                  # [T, k]
        if self.training:
            self._count_load(*parts)
        if on_read is not None:
            on_read(LayerRead(ids.view(B, S, self.n_heads, k), w.detach().view(B, S, self.n_heads, k), gate_record))
        pending = start_readout(self.table, ids, w, options.readout or self.cfg.readout, self.training,
                                self._fetch_thread)
        side = beside(x) if beside is not None else None
        r = finish_readout(self.table, pending)                              # [T, d_v] fp32
        y = self._output(x, r)
        return y if side is None else side + y

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """q = norm(W_q x): x [B, S, D] -> [B*S*h, d_k] fp32."""
        B, S, _ = x.shape
        q = self.q_norm(self.wq(x).view(B * S * self.n_heads, self.d_k))
        return q if q.dtype == torch.float32 else q.float()   # (a no-op .float() is an op all the same)

    def codebooks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.qk_norm:
            return F.normalize(self.codebook_a, dim=-1), F.normalize(self.codebook_b, dim=-1)
        return self.codebook_a, self.codebook_b

    @torch.no_grad()
    def product_scores(self, q: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """q [T, d_k] -> selection scores of the best k product rows [T, k] (with the
        sub-key biases, ablated rows left out)."""
        ca, cb = self.codebooks()
        half = self.d_k // 2
        s, _ = kernels.product_key_search(q[:, :half].contiguous(), q[:, half:].contiguous(), ca.detach(),
                                          cb.detach(), k or self.k, self.bias_a, self.bias_b, self._ablated)
        return s

    def _product_parts(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [T, k] -> (is_prod [T, k]: a product row; i, j [T, k]: its sub-keys, row = i*n + j,
        padding and flat rows clamped into the product segment), made once for the weights and
        the load."""
        n = self.n
        pid = ids.clamp(0, n * n - 1)
        return (ids >= 0) & (ids < n * n), pid // n, pid % n

    def _weights(self, q: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, ids: torch.Tensor,
                 flat_keys: torch.Tensor | None, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
        """w = softmax(q.k_I / tau), recomputed differentiably (no bias). A product key is
        (c_a[i], c_b[j]), so q.k = (q_a C_a^T)[i] + (q_b C_b^T)[j]: gathered from the [T, n]
        sub-scores (a cheap scatter in backward) instead of gathering keys. parts: _product_parts(ids)."""
        is_prod, i, j = parts
        q_a, q_b = q.split(self.d_k // 2, dim=1)    # (split: its backward is one cat, a slice's a zero fill and a copy)
        scores = (q_a @ ca.T).gather(1, i) + (q_b @ cb.T).gather(1, j)     # [T, k]
        if flat_keys is not None:
            flat = torch.einsum("td,tkd->tk", q, self._store_keys(flat_keys, ids, is_prod))
            scores = torch.where(is_prod, scores, flat)
        if self.cfg.tau != 1.0:                     # dividing by 1 changes nothing and is an op
            scores = scores / self.cfg.tau
        return kernels.masked_softmax(scores, ids)

    def _output(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """y = W_o concat_h(r) * silu(W_g x): r [T, d_v] -> [B, S, D]."""
        B, S, _ = x.shape
        y = self.wo((r if r.dtype == x.dtype else r.to(x.dtype)).view(B, S, self.n_heads * self.d_v))
        if self.wg is not None:
            y = y * F.silu(self.wg(x))
        return y

    @torch.no_grad()
    def _count_load(self, is_prod: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
        """Each sub-key's selections among the product rows (is_prod, i, j: _product_parts),
        both halves in one scatter into 2 x (n + 1) bins, the last bin of each taking padding
        and flat rows, then dropped: no boolean-mask indexing and no bincount, each of which
        makes the host wait for the device on CUDA."""
        n = self.n
        sub = torch.stack([i, j]).masked_fill_(~is_prod, n).view(2, -1)              # [2, T*k]
        counts = torch.zeros(2, n + 1, dtype=torch.int64, device=sub.device).scatter_add_(1, sub, torch.ones_like(sub))
        self.load_a += counts[0, :n]    # int64 into the float buffers: cast inside the add
        self.load_b += counts[1, :n]

    @torch.no_grad()
    def _select(self, q: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, k: int, shape: tuple[int, int],
                input_pos: torch.Tensor | None = None, gates: GateState | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, GateRecord | None]:
        """Top-k over all segments by q.k_i + b_i -> ids [T, k], and when flat segments
        exist the flat keys of the selection [T, k, d_k] (0 elsewhere), and on a table with
        gated rows what the gates did. shape = (B, S) of the tokens behind q's T = B*S*h rows."""
        half = self.d_k // 2
        scores, ids = kernels.product_key_search(q[:, :half], q[:, half:], ca, cb, k,
                                                 self.bias_a, self.bias_b, self._ablated)
        if not self._has_flat:
            return ids, None, None
        record = None
        if self._gated:                        # one round trip: the candidates' tags and the detectors
            side = SideQuery(gating.DETECTOR_PARTITION, self.cfg.detector_pool) if self._detectors else None
            res = self.table.search(q, min(k * self.cfg.gate_pool, self._num_rows), tags=gating.GATE_TAGS, side=side,
                                    want_keys=True)
        else:
            res = self.table.search(q, k, want_keys=True)
        flat_scores = res.scores.to(scores.device)
        if self._gated:
            dev = ids.device
            found = None
            if res.side is not None:
                d = res.side
                found = gating.DetectorHits(d.scores.to(dev), d.tags[gating.CUE_TAG].to(dev),
                                            d.tags[gating.GATE_TAG].to(dev), d.tags[gating.AFTER_TAG].to(dev))
            flat = gating.FlatCandidates(flat_scores, res.tags[gating.CUE_TAG].to(dev), res.tags[gating.GATE_TAG].to(dev))
            flat_scores, record = gating.close_gates(scores, flat, found, (*shape, self.n_heads), k, gates, input_pos)
        scores = torch.cat([scores, flat_scores], dim=1)                   # [T, k + flat candidates]
        ids = torch.cat([ids, res.ids.to(ids.device)], dim=1)
        keys = torch.cat([res.keys.new_zeros(res.keys.shape[0], k, self.d_k), res.keys], dim=1).to(q.device)
        top = scores.topk(k, dim=1).indices
        ids = ids.gather(1, top).masked_fill(torch.isneginf(scores.gather(1, top)), kernels.PAD_ID)
        return ids, keys.gather(1, top.unsqueeze(-1).expand(-1, -1, self.d_k)), record

    def _store_keys(self, flat_keys: torch.Tensor, ids: torch.Tensor, is_prod: torch.Tensor) -> torch.Tensor:
        """The flat keys as a leaf whose gradient is sent to the store in backward."""
        keys = flat_keys.clone().requires_grad_(torch.is_grad_enabled())
        if keys.requires_grad:
            table = self.table

            def send(grad: torch.Tensor) -> None:
                is_flat = (ids >= 0) & ~is_prod
                uniq, g = kernels.compact_row_grads(ids.masked_fill(~is_flat, kernels.PAD_ID), grad)
                if uniq.numel():
                    table.accumulate_key_grads(uniq, g, request_id=request_id())
            keys.register_hook(send)
        return keys

    # -- balancing ---------------------------------------------------------
    @torch.no_grad()
    def update_bias(self) -> None:
        """After a step: each sub-key bias moves by a fixed amount against the
        sign of its load error (the store does the same for flat rows)."""
        rate = self.cfg.bias_update_rate
        for load, bias in ((self.load_a, self.bias_a), (self.load_b, self.bias_b)):
            if rate > 0:
                # A step that selected nothing moves nothing: every load is 0, and so is every
                # sign (no python `if` on the sum: the host would wait for the step's kernels).
                # rate * sign is exact: one add, the same bits as bias + rate * sign.
                bias.add_(torch.sign(load.mean() - load), alpha=rate)
            load.zero_()
