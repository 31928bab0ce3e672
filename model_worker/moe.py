"""Mixture-of-experts FFN: one shared expert plus fine-grained routed experts.

Routing follows DeepSeek-V3: per-expert scores (sigmoid or softmax), top-k
selection on score + bias, routing weights = the selected *scores* (not the
biased ones), normalised to sum to 1. The bias is a buffer moved after each step by a
fixed amount against the sign of the expert's load error (loss-free
balancing); it affects selection only. An optional small sequence-level
auxiliary loss is available.

Dispatch sorts the (token, slot) pairs by expert; on a GPU all experts then run at once as
batched matmuls over a padded [E, cap, D] block (RoutedExperts), on the CPU one slice per
expert. There is no loop over tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def expert_counts(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows per expert [E] int64 of expert [M] (ids in [0, E)): torch.bincount's counts, without
    its host syncs (on CUDA bincount reads the ids' min and max back to size its output)."""
    return torch.zeros(n_experts, dtype=torch.int64, device=expert.device).index_add_(
        0, expert, torch.ones_like(expert))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """GPT-2's MLP: w2(gelu(w1 x)), no gate (ModelConfig.mlp = "gelu")."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: w1, w3 [E, D, F], w2 [E, F, D].

    Two ways to run them on rows grouped by expert, with the same math:
    - padded: every expert's rows go into one [E, cap, D] block (cap = the busiest expert's
      rows, zero rows after an expert's own) and the three matmuls run as three batched
      matmuls. A zero row gives a zero output and adds nothing to any weight's gradient, so
      outputs and gradients equal the loop's up to rounding. The op count no longer grows
      with E: a small model on a GPU is bound by kernel launches, and the loop's ~10 kernels
      per expert per layer (forward and backward) were most of a training step's.
    - loop: one slice per expert; the reference the padded path is tested against.
    `mode` "auto" (the default) takes the padded path on a GPU unless routing is so skewed
    that the padding would pass `max_padding` times the rows (E x cap > max_padding x M),
    and the loop on the CPU: there no launch is saved, padding only adds FLOPs, and the CPU
    keeps its results bit for bit across this change (rounding differs between the paths,
    and a knowledge layer's top-k can turn a last-bit difference into another row).
    "padded" and "loop" force one path (benchmarks/launch_count.py compares them).
    A third, opt-in way (grouped_bf16) runs them as bf16 grouped GEMMs: other numerics.
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int, std: float = 0.02,
                 max_padding: float = 4.0, grouped_bf16: bool = False, mode: str = "auto"):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * std)
        self.w3 = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * std)
        self.w2 = nn.Parameter(torch.randn(n_experts, d_expert, d_model) * std)
        self.max_padding = max_padding
        if mode not in ("auto", "padded", "loop"):
            raise ValueError(f"mode must be auto, padded or loop; got {mode!r}")
        self.mode = mode
        if grouped_bf16 and not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"moe_grouped_bf16 needs torch._grouped_mm, which torch {torch.__version__} lacks")
        if grouped_bf16 and (d_model % 8 or d_expert % 8):
            # grouped GEMMs need 16-byte row strides: 8 bf16 elements
            raise ValueError(f"moe_grouped_bf16 needs d_model and d_expert multiples of 8; got {d_model}, {d_expert}")
        self.grouped_bf16 = grouped_bf16

    def use_padded(self, on_gpu: bool, E: int, cap: int, M: int) -> bool:
        """Whether `mode` sends this call down the padded path."""
        if self.mode != "auto":
            return self.mode == "padded"
        return on_gpu and E * cap <= self.max_padding * M

    def forward(self, x_sorted: torch.Tensor, expert_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x_sorted: [M, D], rows grouped by expert (ascending); expert_sorted [M] each row's
        # expert; counts [E] rows per expert. One host sync (cap, or the loop's split sizes).
        M, D = x_sorted.shape
        E = counts.shape[0]
        if M == 0:
            return x_sorted.new_zeros(0, D)
        if self.grouped_bf16:
            return self.forward_grouped(x_sorted, counts)
        if self.mode == "loop" or (self.mode == "auto" and not x_sorted.is_cuda):
            return self.forward_loop(x_sorted, counts.tolist())
        cap = int(counts.max())
        if not self.use_padded(x_sorted.is_cuda, E, cap, M):
            return self.forward_loop(x_sorted, counts.tolist())
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(M, device=x_sorted.device) - starts[expert_sorted] + expert_sorted * cap
        xp = x_sorted.new_zeros(E * cap, D).index_copy(0, pos, x_sorted).view(E, cap, D)
        yp = torch.bmm(F.silu(torch.bmm(xp, self.w1)) * torch.bmm(xp, self.w3), self.w2)
        return yp.view(E * cap, D).index_select(0, pos)

    def forward_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The three matmuls as grouped GEMMs in bf16 (fp32 accumulate; what torchtitan runs on
        sm90): no padding, no host sync, no loop. Not the fp32 paths' numerics: inputs and
        weights are rounded to bf16 (the fp32 weights stay the optimizer's), so it is opt-in
        (ModelConfig.moe_grouped_bf16) and a comparison that uses it says so."""
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xb = x_sorted.to(torch.bfloat16)
        w1, w3, w2 = (w.to(torch.bfloat16) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(xb, w1, offs=offs)) * torch._grouped_mm(xb, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs).to(x_sorted.dtype)

    def forward_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = []
        for e, chunk in enumerate(torch.split(x_sorted, counts)):
            if chunk.shape[0] == 0:
                continue
            outs.append((F.silu(chunk @ self.w1[e]) * (chunk @ self.w3[e])) @ self.w2[e])
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, x_sorted.shape[-1])


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_active = cfg.n_active
        self.score_func = cfg.router
        self.route_norm = cfg.route_norm
        self.proj = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)    # x -> per-expert logits
        # Selection-only balancing bias (persistent: part of a checkpoint).
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [T, D] -> scores [T, E], top_idx [T, K], routing weights [T, K]
        logits = self.proj(x).float()
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        top_idx = torch.topk(scores + self.expert_bias, self.n_active, dim=-1).indices
        weights = scores.gather(-1, top_idx)
        if self.route_norm:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        return scores, top_idx, weights


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.n_active = cfg.n_active
        self.bias_rate = cfg.moe_bias_rate
        self.aux_loss_coef = cfg.aux_loss_coef
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.n_experts, cfg.d_model, cfg.d_expert, cfg.init_std,
                                     grouped_bf16=cfg.moe_grouped_bf16)
        self.shared = FeedForward(cfg.d_model, cfg.d_expert * cfg.n_shared) if cfg.n_shared > 0 else None
        # Tokens routed to each expert since the last update_bias() (training only);
        # `last_load` is the load of the last step, for reporting.
        self.register_buffer("load", torch.zeros(cfg.n_experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(cfg.n_experts), persistent=False)
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]
        B, S, D = x.shape
        self.aux_loss = x.new_zeros(())
        xf = x.reshape(-1, D)                                   # [T, D]
        scores, top_idx, weights = self.router(xf)              # [T, E], [T, K], [T, K]

        # Sort the T*K (token, slot) pairs by expert: each expert then sees one contiguous slice.
        flat_expert = top_idx.reshape(-1)                       # [T*K]
        order = torch.argsort(flat_expert, stable=True)         # [T*K]
        token_of = order // self.n_active                       # which token each sorted pair came from
        counts = expert_counts(flat_expert, self.n_experts)      # [E]
        y_sorted = self.experts(xf[token_of], flat_expert[order], counts)  # [T*K, D]
        y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        out = torch.zeros_like(xf).index_add_(0, token_of, y_sorted)

        if self.shared is not None:
            out = out + self.shared(xf)
        if self.training:
            self.load += counts.to(self.load.dtype)
            if self.aux_loss_coef > 0:
                self.aux_loss = self._seq_aux_loss(scores.view(B, S, -1), top_idx.view(B, S, -1))
        return out.view(B, S, D)

    def _seq_aux_loss(self, scores: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 complementary sequence-wise balance loss: alpha * sum_i f_i P_i."""
        B, S, E = scores.shape
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)                       # [B, E]
        f = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, top_idx.reshape(B, -1), torch.ones(B, S * self.n_active, device=scores.device))
        f = f * E / (self.n_active * S)
        return self.aux_loss_coef * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """After an optimizer step: b_e += rate * sign(mean load - load_e). Returns the step's load."""
        load = self.load.clone()
        if self.bias_rate > 0:
            # Skipped on the device when nothing was routed (a python `if` on the sum would make the
            # host wait for the step's kernels).
            moved = self.router.expert_bias + self.bias_rate * torch.sign(load.mean() - load)
            self.router.expert_bias.copy_(torch.where(load.sum() > 0, moved, self.router.expert_bias))
        self.last_load.copy_(load)
        self.load.zero_()
        return load
