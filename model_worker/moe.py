"""Mixture-of-experts FFN: one shared expert plus fine-grained routed experts.

Routing follows DeepSeek-V3: per-expert scores (sigmoid or softmax), top-k
selection on score + bias, routing weights = the selected *scores* (not the
biased ones), normalised to sum to 1. The bias is a buffer moved after each step by a
fixed amount against the sign of the expert's load error (loss-free
balancing); it affects selection only. An optional small sequence-level
auxiliary loss is available.

On a GPU all experts run at once as batched matmuls over a padded [E, cap, D] block; on
the CPU the (token, slot) pairs are sorted by expert and each expert runs on its slice
(RoutedExperts). There is no loop over tokens.
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
    """E SwiGLU experts with stacked weights: w1, w3 [E, D, F], w2 [E, F, D], run on the
    (token, slot) pairs a router chose: out[t] = sum_k weights[t, k] * expert_{top_idx[t, k]}(x[t]).

    Two ways to run them, with the same math:
    - padded: every expert's rows go into one [E, cap, D] block (cap = the busiest expert's
      rows, zero rows after an expert's own) and the three matmuls run as three batched
      matmuls. A zero row gives a zero output and adds nothing to any weight's gradient, so
      outputs and gradients equal the loop's up to rounding. The op count no longer grows
      with E: a small model on a GPU is bound by kernel launches, and the loop's ~10 kernels
      per expert per layer (forward and backward) were most of a training step's. Each pair's
      row in the block comes from a running count of the pairs per expert (no sort), and the
      outputs are gathered back in pair order and summed over the slots: a handful of ops
      per layer, each of which costs a small model's step host time whether or not it
      launches a kernel.
    - loop: the pairs sorted by expert, one slice per expert, the weighted outputs added
      back per token in that order; the reference the padded path is tested against.
    `mode` "auto" (the default) takes the padded path on a GPU unless routing is so skewed
    that the padding would pass `max_padding` times the rows (E x cap > max_padding x M),
    and the loop on the CPU: there no launch is saved, padding only adds FLOPs, and the CPU
    keeps its results bit for bit across this change (rounding differs between the paths,
    and a knowledge layer's top-k can turn a last-bit difference into another row).
    "padded" and "loop" force one path (benchmarks/launch_count.py compares them).
    A third, opt-in way (grouped_bf16) runs the sorted pairs as bf16 grouped GEMMs: other numerics.
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int, std: float = 0.02,
                 max_padding: float = 4.0, grouped_bf16: bool = False, mode: str = "auto"):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * std)
        self.w3 = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * std)
        self.w2 = nn.Parameter(torch.randn(n_experts, d_expert, d_model) * std)
        # The expert ids [E, 1], kept rather than built each call (an op each time)
        self.register_buffer("expert_ids", torch.arange(n_experts).unsqueeze(1), persistent=False)
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

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], top_idx [T, K] each token's experts, weights [T, K] their routing weights
        -> (the weighted sum of the experts' outputs [T, D], pairs per expert [E] int64).
        One host sync (the padded block's size, or the loop's split sizes)."""
        E = self.w1.shape[0]
        if x.shape[0] == 0:
            return torch.zeros_like(x), torch.zeros(E, dtype=torch.int64, device=x.device)
        if self.grouped_bf16 or self.mode == "loop" or (self.mode == "auto" and not x.is_cuda):
            counts = expert_counts(top_idx.reshape(-1), E)
            return self.forward_sorted(x, top_idx, weights, counts), counts
        expert = top_idx.view(1, -1)                                     # [1, M], M = T*K pairs
        # seen[e, j]: the pairs j' <= j routed to e (an exclusive count would cost an op more).
        # Laid out [E, M] and scanned along its last dim: a scan along dim 0 of [M, E] runs
        # one thread per column down all M rows on CUDA, 46 of an 82 ms knowledge step on
        # the H100 (launch_count, f4961dd); the innermost scan is parallel within each row.
        seen = (expert == self.expert_ids).cumsum(1)                     # [E, M]
        counts = seen[:, -1]
        cap = int(counts.max())
        if not self.use_padded(x.is_cuda, E, cap, expert.shape[1]):
            return self.forward_sorted(x, top_idx, weights, counts), counts
        return self.forward_padded(x, weights, expert, seen, cap), counts

    def forward_padded(self, x: torch.Tensor, weights: torch.Tensor, expert: torch.Tensor, seen: torch.Tensor,
                       cap: int) -> torch.Tensor:
        """The padded path: x [T, D], weights [T, K], expert [1, T*K], seen [E, T*K] (forward's
        running count) -> [T, D]. Pair j's row in the block is expert * cap + (its rank among
        its expert's pairs, in pair order: the order a stable sort by expert keeps)."""
        (T, D), K, E = x.shape, weights.shape[1], seen.shape[0]
        slot = torch.add(seen.gather(0, expert), expert, alpha=cap).view(T, K) - 1       # [T, K]
        # (views rather than unsqueeze, torch.zeros rather than new_zeros: fewer ops each)
        xp = torch.zeros(E * cap, D, dtype=x.dtype, device=x.device).index_put_((slot,), x.view(T, 1, D))
        xp = xp.view(E, cap, D)                                                         # each token in its K rows
        yp = torch.bmm(F.silu(torch.bmm(xp, self.w1)) * torch.bmm(xp, self.w3), self.w2)
        # back in pair order; index_select, not yp[slot]: its backward is an index_add_, where
        # indexing's is an accumulating index_put_, which sorts the indices on CUDA
        y = yp.view(E * cap, D).index_select(0, slot.view(-1)).view(T, K, D)
        return (y * _as_dtype(weights, y.dtype).view(T, K, 1)).sum(1)

    def forward_sorted(self, x: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
        """The loop (or grouped bf16) path: the pairs sorted by expert, so that each expert
        sees one contiguous slice; the weighted outputs added back per token in sorted order."""
        K = top_idx.shape[1]
        flat_expert = top_idx.reshape(-1)                                # [M]
        order = torch.argsort(flat_expert, stable=True)                  # [M]
        token_of = order // K                                            # which token each sorted pair came from
        x_sorted = x[token_of]
        y = self.forward_grouped(x_sorted, counts) if self.grouped_bf16 else self.forward_loop(x_sorted, counts.tolist())
        y = y * _as_dtype(weights.reshape(-1)[order], y.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, y)

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
        """x_sorted [M, D] rows grouped by expert (ascending), counts[e] rows of expert e -> [M, D]."""
        outs = []
        for e, chunk in enumerate(torch.split(x_sorted, counts)):
            if chunk.shape[0] == 0:
                continue
            outs.append((F.silu(chunk @ self.w1[e]) * (chunk @ self.w3[e])) @ self.w2[e])
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, x_sorted.shape[-1])


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; no op when it already is (a no-op .to() is still an op the host pays for)."""
    return t if t.dtype == dtype else t.to(dtype)


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
        logits = _as_dtype(self.proj(x), torch.float32)
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
        if self.aux_loss_coef > 0:   # else aux_loss stays the zero it was built with
            self.aux_loss = x.new_zeros(())
        xf = x.reshape(-1, D)                                   # [T, D]
        scores, top_idx, weights = self.router(xf)              # [T, E], [T, K], [T, K]
        out, counts = self.experts(xf, top_idx, weights)        # [T, D], [E]
        if self.shared is not None:
            out = out + self.shared(xf)
        if self.training:
            self.load += counts       # int64 into the float buffer: cast inside the add, not by an op of its own
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
            # A step that routed nothing moves nothing: every load is 0, and so is every sign
            # (no python `if` on the sum, which would make the host wait for the step's kernels).
            # (alpha * sign is exact: one add, the same bits as adding rate * sign)
            self.router.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_rate)
        self.last_load.copy_(load)
        self.load.zero_()
        return load
