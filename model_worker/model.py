"""A decoder-only transformer whose FFNs are dense or MoE and whose chosen
blocks carry a knowledge layer reading from a `KnowledgeTable`.

The model never knows whether its table is in-process or remote (DESIGN.md
section 7); it reaches it only through the knowledge layers.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from store_service.interface import KnowledgeTable

from .config import ModelConfig
from .gating import GateState
from .knowledge_layer import KnowledgeLayer
from .moe import FeedForward, GeluMLP, MoE
from .reading import ReadOptions, ReadTrace


class KVCache(nn.Module):
    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype=torch.float32):
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: [S], k, v: [B, H, S, hd] -> full caches [B, H, max_len, hd]
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


def precompute_rope(max_len: int, dim: int, base: float) -> torch.Tensor:
    """-> [max_len, dim/2, 2] (cos, sin)."""
    freqs = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, hd], rope: [S, hd/2, 2]
    xs = x.float().unflatten(-1, (-1, 2))                      # [B, S, H, hd/2, 2]
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]        # [S, 1, hd/2]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        # x: [B, S, D], rope: [S, hd/2, 2], mask: [S, max_len] bool or None (plain causal)
        B, S, _ = x.shape
        q, k, v = self.wqkv(x).view(B, S, 3, self.n_heads, self.head_dim).unbind(2)  # [B, S, H, hd]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                              # [B, H, S, hd]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        kn = cfg.knowledge if cfg.knowledge is not None and layer_id in cfg.knowledge.layers else None
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module | None = None
        if kn is None or kn.placement == "beside":
            dense = FeedForward if cfg.mlp == "swiglu" else GeluMLP
            self.ffn = MoE(cfg) if cfg.ffn == "moe" else dense(cfg.d_model, cfg.d_ff)
        self.knowledge = KnowledgeLayer(cfg.d_model, kn, init_std=cfg.init_std) if kn is not None else None

    def forward(self, x, rope, mask, input_pos, read: dict | None = None):
        # read: the knowledge layer's per-call arguments (options, gates, on_read)
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        n = self.ffn_norm(h)
        if self.knowledge is None:
            return h + self.ffn(n)
        # Beside: the FFN runs while a fetch-mode readout's rows are in flight.
        return h + self.knowledge(n, beside=self.ffn, input_pos=input_pos, **(read or {}))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, table: KnowledgeTable | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("rope", precompute_rope(cfg.block_size, cfg.head_dim, cfg.rope_base), persistent=False)
        self.causal_mask: torch.Tensor | None = None
        self.gate_states: dict[int, GateState] | None = None   # generation: per knowledge block
        self._options = ReadOptions()                           # set by `reading`
        self._trace: ReadTrace | None = None
        self._init_weights()
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if table is not None:
            self.attach_table(table)
        elif self.knowledge_layers():
            raise ValueError("this config has knowledge layers: pass a table")

    def _init_weights(self):
        # Plain normal init; residual output projections scaled by depth (GPT-2).
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if "knowledge" in name:
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            if name.endswith(("attention.wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, std=std / (2 * self.cfg.n_layers) ** 0.5)

    # -- the table ---------------------------------------------------------
    def knowledge_layers(self) -> list[KnowledgeLayer]:
        return [b.knowledge for b in self.layers if b.knowledge is not None]

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def attach_table(self, table: KnowledgeTable) -> None:
        """Every knowledge layer reads the same table (each with its own query
        projection and codebooks)."""
        for kl in self.knowledge_layers():
            kl.attach(table)

    def tables(self) -> list[KnowledgeTable]:
        seen: dict[int, KnowledgeTable] = {}
        for kl in self.knowledge_layers():
            seen.setdefault(id(kl.table), kl.table)
        return list(seen.values())

    def refresh_table_state(self) -> None:
        for kl in self.knowledge_layers():
            kl.refresh_table_state()

    def close(self) -> None:
        """Stop the knowledge layers' fetch threads."""
        for kl in self.knowledge_layers():
            kl.close()

    # -- per-call options --------------------------------------------------
    @contextlib.contextmanager
    def reading(self, *, k: int | None = None, readout: str | None = None,
                record: bool = False) -> Iterator[ReadTrace | None]:
        """Inside, every forward's knowledge layers read k rows per head (None: their
        trained k) by `readout` ("pushdown" / "fetch" / "auto"; None: their config's);
        with record, what they read goes to the yielded ReadTrace (one entry per call).
        Blocks nest: an inner block keeps what it leaves unset from the outer one."""
        options = ReadOptions(k, readout)
        for kl in self.knowledge_layers():
            if k is not None and k > kl.n * kl.n:
                raise ValueError(f"k={k} outside [1, {kl.n * kl.n}]")
        trace = ReadTrace() if record else None
        saved = self._options, self._trace
        self._options = options.within(self._options)
        self._trace = trace if trace is not None else self._trace
        try:
            yield trace
        finally:
            self._options, self._trace = saved

    def _knowledge_call(self, i: int) -> dict:
        """Block i's knowledge layer's arguments for this call."""
        read = {"options": self._options}
        if self.gate_states is not None:
            read["gates"] = self.gate_states[i]
        if self._trace is not None:
            read["on_read"] = functools.partial(self._trace.add, i)
        return read

    # -- generation caches -------------------------------------------------
    def setup_caches(self, batch: int, max_len: int | None = None) -> None:
        max_len = max_len or self.cfg.block_size
        assert max_len <= self.cfg.block_size
        dtype = self.output.weight.dtype
        for b in self.layers:
            b.attention.kv_cache = KVCache(batch, self.cfg.n_heads, max_len, self.cfg.head_dim, dtype).to(
                self.output.weight.device)
        self.causal_mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=self.output.weight.device))
        # The gates of tables with gated rows carry from call to call like the KV cache (gating.py).
        self.gate_states = {i: GateState() for i, b in enumerate(self.layers) if b.knowledge is not None}

    def clear_caches(self) -> None:
        for b in self.layers:
            b.attention.kv_cache = None
        self.causal_mask = None
        self.gate_states = None

    # -- forward -----------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # idx: [B, S] token ids; input_pos: [S] positions (generation with caches) -> logits [B, S, V]
        S = idx.shape[1]
        if self.causal_mask is not None:
            assert input_pos is not None, "with caches set up, pass input_pos"
            rope, mask = self.rope[input_pos], self.causal_mask[input_pos]   # [S, hd/2, 2], [S, max_len]
        else:
            rope, mask = self.rope[:S], None
        x = self.tok_embeddings(idx)
        if self._trace is not None:
            self._trace.begin_call()
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, input_pos, self._knowledge_call(i) if block.knowledge is not None else None)
        logits = self.output(self.norm(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE auxiliary balance losses of the last forward (0 when off)."""
        # Layers with the loss off add nothing and are left out (each add is an op a step).
        return sum((m.aux_loss for m in self.moe_layers() if m.aux_loss_coef > 0), torch.zeros(()))

    @torch.no_grad()
    def end_step(self) -> dict[str, torch.Tensor]:
        """After the optimizer step: move the MoE and product-key balancing
        biases; returns the step's per-expert load of each MoE layer."""
        loads = {f"moe{i}": m.update_bias() for i, m in enumerate(self.moe_layers())}
        for kl in self.knowledge_layers():
            kl.update_bias()
        return loads

    # -- accounting --------------------------------------------------------
    def count_params(self) -> dict[str, int]:
        """total: every parameter, table rows (values and flat keys) included.
        active: what one token uses: embeddings once, attention, shared experts,
        routers, n_active/n_experts of the routed experts, and per knowledge layer
        its projections, its codebooks (searched in full) and the h*k rows it reads."""
        cfg = self.cfg
        model_total = sum(p.numel() for p in self.parameters())
        routed = sum(m.experts.w1.numel() + m.experts.w2.numel() + m.experts.w3.numel() for m in self.moe_layers())
        active = model_total - routed + routed * cfg.n_active // cfg.n_experts
        table_total = 0
        for t in self.tables():
            info = t.info()
            flat = sum(s.num_rows for s in info.segments if s.kind != "product")
            table_total += info.num_rows * info.d_v + flat * info.d_k
        for kl in self.knowledge_layers():
            active += kl.n_heads * kl.k * (kl.d_v + (kl.d_k if kl.has_flat_rows else 0))
        return {"total": model_total + table_total, "active": active,
                "model": model_total, "table": table_total}
