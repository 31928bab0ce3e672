"""Row-wise sparse optimizers: SGD and Adam over (unique rows, row gradients).

Only the rows a step touched move. Adam keeps m, v per element and one step
count per row, so a row's bias correction counts the steps *it* was updated,
which makes a row's trajectory equal to dense `torch.optim.Adam` run on that
row alone with the steps it received a gradient (the semantics of TorchRec's
row-wise sparse Adam, without its row-wise v). Frozen rows, and their state,
are never touched. Math in fp32; bf16 parameters are rounded to nearest after
the update.

`OptimizerConfig` says which optimizer and its settings; `RowOptimizer` is what
`set_optimizer` replaces on a live table (the optimizer and the balancing step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import errors

OPTIMIZER_KINDS = ("adam", "sgd")


@dataclass
class OptimizerConfig:
    """Row-wise sparse optimizer applied at the step barrier (DESIGN.md section 4)."""
    kind: str = "adam"                  # "adam" | "sgd"
    lr: float = 1e-3                    # for values
    key_lr: float | None = None         # for flat keys; None -> lr
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.kind not in OPTIMIZER_KINDS:
            raise errors.InvalidArgument("optimizer.kind", f"must be 'adam' or 'sgd', got {self.kind!r}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise errors.InvalidArgument("optimizer.lr", f"must be finite and >= 0, got {self.lr}")
        if self.key_lr is not None and not (self.key_lr >= 0 and math.isfinite(self.key_lr)):
            raise errors.InvalidArgument("optimizer.key_lr", f"must be finite and >= 0 (or None: lr), got {self.key_lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise errors.InvalidArgument("optimizer.betas", f"must be in [0, 1), got {self.betas}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise errors.InvalidArgument("optimizer.eps", f"must be > 0, got {self.eps}")

    @property
    def effective_key_lr(self) -> float:
        return self.lr if self.key_lr is None else self.key_lr


@dataclass(frozen=True)
class RowOptimizer:
    """A table's row optimizer and balancing step, as `set_optimizer` sets and returns them."""
    optimizer: OptimizerConfig
    bias_step: float


@dataclass
class RowState:
    steps: torch.Tensor          # [R] int64: updates applied to each row
    m: torch.Tensor | None       # [R, d] fp32 (adam)
    v: torch.Tensor | None       # [R, d] fp32 (adam)

    @classmethod
    def zeros(cls, kind: str, num_rows: int, dim: int, device: torch.device | str = "cpu") -> "RowState":
        steps = torch.zeros(num_rows, dtype=torch.int64, device=device)
        if kind == "adam":
            return cls(steps, torch.zeros(num_rows, dim, device=device), torch.zeros(num_rows, dim, device=device))
        return cls(steps, None, None)

    def append(self, n: int) -> None:
        """Room for n new rows at the end (add_rows)."""
        self.steps = torch.cat([self.steps, self.steps.new_zeros(n)])
        if self.m is not None:
            self.m = torch.cat([self.m, self.m.new_zeros(n, self.m.shape[1])])
            self.v = torch.cat([self.v, self.v.new_zeros(n, self.v.shape[1])])


def sparse_step(kind: str, param: torch.Tensor, state: RowState, rows: torch.Tensor, grads: torch.Tensor, *,
                lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                frozen: torch.Tensor | None = None) -> None:
    """Update param[rows] in place. rows [U] int64 local, unique; grads [U, d]
    fp32; frozen [R] bool (rows where True are skipped entirely)."""
    plan = plan_step(kind, param, state, rows, grads, lr=lr, betas=betas, eps=eps, frozen=frozen)
    if plan is not None:
        plan.commit()


@dataclass
class StepPlan:
    """One sparse step computed but not yet written (so a caller can check it first)."""
    what: str
    param: torch.Tensor
    state: RowState
    rows: torch.Tensor
    new_param: torch.Tensor
    new_steps: torch.Tensor
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.new_param, self.m, self.v) if t is not None)

    def commit(self) -> None:
        self.state.steps.index_copy_(0, self.rows, self.new_steps)
        if self.m is not None:
            self.state.m.index_copy_(0, self.rows, self.m)
            self.state.v.index_copy_(0, self.rows, self.v)
        self.param.index_copy_(0, self.rows, self.new_param.to(self.param.dtype))


def plan_step(kind: str, param: torch.Tensor, state: RowState, rows: torch.Tensor, grads: torch.Tensor, *,
              lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              frozen: torch.Tensor | None = None, what: str = "") -> StepPlan | None:
    """sparse_step's arithmetic, nothing written: the new rows and state (None: no row to update)."""
    if frozen is not None and rows.numel():
        keep = ~frozen[rows]
        rows, grads = rows[keep], grads[keep]
    if rows.numel() == 0:
        return None
    g = grads.float()
    p = param.index_select(0, rows).float()
    new_steps = state.steps.index_select(0, rows) + 1
    plan = StepPlan(what or "rows", param, state, rows, p, new_steps)
    if kind == "sgd":
        p.add_(g, alpha=-lr)  # the op torch.optim.SGD uses, so results match it bitwise
    elif kind == "adam":
        b1, b2 = betas
        m, v = state.m.index_select(0, rows), state.v.index_select(0, rows)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        t = new_steps.double()
        step_size = (lr / (1 - b1 ** t)).float().unsqueeze(1)       # [U, 1]
        bc2_sqrt = (1 - b2 ** t).sqrt().float().unsqueeze(1)        # [U, 1]
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)
        p.sub_((m * step_size).div_(denom))
        plan.m, plan.v = m, v
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}")
    return plan
