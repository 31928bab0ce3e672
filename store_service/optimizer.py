"""Row-wise sparse optimizers over (unique rows, row gradients), chosen per table.

Only the rows a step touched move; frozen rows, and their state, are never touched.
Math in fp32; bf16 parameters are rounded to nearest after the update. Every kind
keeps one int64 step count per row (`steps`: the updates that row received).

Kinds and the state they keep per row of dimension d (besides `steps`):

- "sgd":             nothing.                      p -= lr * g
- "adam":            m, v fp32 [d] each (8 bytes per element: 400% of bf16 values).
                     Dense Adam run on the row alone with the steps it received a
                     gradient (bias correction counts the row's own steps), as TorchRec's
                     row-wise sparse Adam without its row-wise v.
- "rowwise_adagrad": acc fp32, one per row (FBGEMM / TorchRec row-wise Adagrad):
                     acc += mean(g^2 over the row); p -= lr * g / (sqrt(acc) + eps).
- "rowwise_adam":    row_v fp32, one per row, and NO first moment: Adam with beta1 = 0
                     and a row-wise second moment, bias-corrected by the row's steps:
                     row_v = b2 * row_v + (1 - b2) * mean(g^2);
                     p -= lr * g / (sqrt(row_v / (1 - b2^t)) + eps). betas[0] is unused.
                     A first moment of any useful shape costs a value's bytes or more
                     (a bf16 m alone is 100% of bf16 values), so it is left out.
- "auto" (the default): "rowwise_adam" for a large table (values of at least
                     LARGE_TABLE_VALUE_BYTES), "adam" otherwise; resolved when a table
                     config is built or an optimizer is set (`resolve_kind`).

The row-wise kinds cost (4 + 8) bytes per row: 0.6% of 1024 bf16 values, 9.4% of 64.

`OptimizerConfig` says which optimizer and its settings; `RowOptimizer` is what
`set_optimizer` replaces on a live table (the optimizer and the balancing step).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import errors

OPTIMIZER_KINDS = ("adam", "sgd", "rowwise_adagrad", "rowwise_adam")
AUTO = "auto"
# "Large": a table whose values take at least this many bytes gets the row-wise default
# (dense Adam state would be 2x (bf16: 4x) the values on top of them).
LARGE_TABLE_VALUE_BYTES = 1 << 30
LARGE_TABLE_DEFAULT = "rowwise_adam"
# Per-row state arrays a `RowState` may hold, by the kind that uses them.
_STATE_OF_KIND = {"adam": ("m", "v"), "sgd": (), "rowwise_adagrad": ("acc",), "rowwise_adam": ("row_v",)}
# Their persisted names (per owned row / per owned flat row), beside opt_steps / key_steps.
ROW_STATE_ARRAYS = ("opt_m", "opt_v", "opt_acc", "opt_row_v")
FLAT_STATE_ARRAYS = ("key_m", "key_v", "key_acc", "key_row_v")


@dataclass
class OptimizerConfig:
    """Row-wise sparse optimizer applied at the step barrier (DESIGN.md section 4)."""
    kind: str = AUTO                    # one of OPTIMIZER_KINDS, or "auto"
    lr: float = 1e-3                    # for values
    key_lr: float | None = None         # for flat keys; None -> lr
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.kind not in OPTIMIZER_KINDS + (AUTO,):
            raise errors.InvalidArgument("optimizer.kind", f"must be one of {OPTIMIZER_KINDS + (AUTO,)}, "
                                                           f"got {self.kind!r}")
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


def value_bytes_per_elem(value_dtype: str) -> int:
    return 2 if value_dtype == "bfloat16" else 4


def resolve_kind(optimizer: OptimizerConfig, num_rows: int, d_v: int, value_dtype: str) -> OptimizerConfig:
    """`optimizer` with "auto" replaced by the kind for a table of that size."""
    if optimizer.kind != AUTO:
        return optimizer
    large = num_rows * d_v * value_bytes_per_elem(value_dtype) >= LARGE_TABLE_VALUE_BYTES
    return dataclasses.replace(optimizer, kind=LARGE_TABLE_DEFAULT if large else "adam")


def state_bytes_per_row(kind: str, dim: int) -> int:
    """Optimizer bytes one row of dimension `dim` costs under `kind`, its step count included."""
    return 8 + {"adam": 8 * dim, "sgd": 0, "rowwise_adagrad": 4, "rowwise_adam": 4}[kind]


@dataclass(frozen=True)
class RowOptimizer:
    """A table's row optimizer and balancing step, as `set_optimizer` sets and returns them."""
    optimizer: OptimizerConfig
    bias_step: float


@dataclass
class RowState:
    steps: torch.Tensor                  # [R] int64: updates applied to each row
    m: torch.Tensor | None = None        # [R, d] fp32 (adam)
    v: torch.Tensor | None = None        # [R, d] fp32 (adam)
    acc: torch.Tensor | None = None      # [R] fp32 (rowwise_adagrad): sum of mean squared gradients
    row_v: torch.Tensor | None = None    # [R] fp32 (rowwise_adam): EMA of mean squared gradients

    @classmethod
    def zeros(cls, kind: str, num_rows: int, dim: int, device: torch.device | str = "cpu") -> "RowState":
        st = cls(torch.zeros(num_rows, dtype=torch.int64, device=device))
        st.ensure(kind, dim)
        return st

    def ensure(self, kind: str, dim: int) -> None:
        """Allocate (zeros) the state `kind` needs and this one lacks; what it holds stays."""
        n, dev = self.steps.shape[0], self.steps.device
        for name in _STATE_OF_KIND[kind]:
            if getattr(self, name) is None:
                shape = (n, dim) if name in ("m", "v") else (n,)
                setattr(self, name, torch.zeros(shape, dtype=torch.float32, device=dev))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor held, by field name (steps first)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def append(self, n: int) -> None:
        """Room for n new rows at the end (add_rows)."""
        for name, t in self.tensors().items():
            setattr(self, name, torch.cat([t, t.new_zeros(n, *t.shape[1:])]))

    def to_arrays(self, prefix: str) -> dict[str, torch.Tensor]:
        """Persisted names: <prefix>_steps, <prefix>_m, ... (prefix "opt" or "key")."""
        return {f"{prefix}_{name}": t for name, t in self.tensors().items()}

    @classmethod
    def from_arrays(cls, prefix: str, get) -> "RowState":
        """Inverse of to_arrays; get(name) -> tensor or None (absent: not kept)."""
        return cls(get(f"{prefix}_steps"), *(get(f"{prefix}_{n}") for n in ("m", "v", "acc", "row_v")))


def _row_mean_sq(g: torch.Tensor) -> torch.Tensor:
    return g.square().mean(dim=1)


def sparse_step(kind: str, param: torch.Tensor, state: RowState, rows: torch.Tensor, grads: torch.Tensor, *,
                lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                frozen: torch.Tensor | None = None) -> None:
    """Update param[rows] in place. rows [U] int64 local, unique; grads [U, d]
    fp32; frozen [R] bool (rows where True are skipped entirely). `state` must hold
    what `kind` needs (RowState.ensure)."""
    plan = plan_step(kind, param, state, rows, grads, lr=lr, betas=betas, eps=eps, frozen=frozen)
    if plan is not None:
        plan.commit()


@dataclass
class StepPlan:
    """One sparse step computed but not yet written (so a caller can check it first).
    `new_state`: the touched rows' new optimizer state by RowState field (m, v, acc, row_v:
    whichever the kind keeps), written with the rows only on commit."""
    what: str
    param: torch.Tensor
    state: RowState
    rows: torch.Tensor
    new_param: torch.Tensor
    new_steps: torch.Tensor
    new_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def finite_verdict(self) -> torch.Tensor:
        """Whether the new rows and state are all finite: a 0-dim bool on their device (reading
        it is a host sync; step.finite_plans reads several plans' at once)."""
        return torch.stack([torch.isfinite(t).all() for t in (self.new_param, *self.new_state.values())]).all()

    def commit(self) -> None:
        self.state.steps.index_copy_(0, self.rows, self.new_steps)
        for name, t in self.new_state.items():
            getattr(self.state, name).index_copy_(0, self.rows, t)
        self.param.index_copy_(0, self.rows, self.new_param.to(self.param.dtype))


def plan_step(kind: str, param: torch.Tensor, state: RowState, rows: torch.Tensor, grads: torch.Tensor, *,
              lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              frozen: torch.Tensor | None = None, what: str = "") -> StepPlan | None:
    """sparse_step's arithmetic, nothing written: the new rows and state (None: no row to update)."""
    if kind not in _STATE_OF_KIND:
        raise ValueError(f"unknown optimizer kind {kind!r}")
    if frozen is not None and rows.numel():
        keep = torch.nonzero(~frozen[rows]).squeeze(1)   # one host sync (for rows and grads)
        rows, grads = rows[keep], grads[keep]
    if rows.numel() == 0:
        return None
    g = grads.float()
    p = param.index_select(0, rows).float()
    new_steps = state.steps.index_select(0, rows) + 1
    plan = StepPlan(what or "rows", param, state, rows, p, new_steps)
    b1, b2 = betas
    if kind == "sgd":
        p.add_(g, alpha=-lr)  # the op torch.optim.SGD uses, so results match it bitwise
    elif kind == "adam":
        m, v = state.m.index_select(0, rows), state.v.index_select(0, rows)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        t = new_steps.double()
        step_size = (lr / (1 - b1 ** t)).float().unsqueeze(1)       # [U, 1]
        bc2_sqrt = (1 - b2 ** t).sqrt().float().unsqueeze(1)        # [U, 1]
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)
        p.sub_((m * step_size).div_(denom))
        plan.new_state = {"m": m, "v": v}
    elif kind == "rowwise_adagrad":
        acc = state.acc.index_select(0, rows) + _row_mean_sq(g)     # [U]
        p.sub_(g * (lr / (acc.sqrt() + eps)).unsqueeze(1))
        plan.new_state = {"acc": acc}
    else:  # rowwise_adam
        rv = state.row_v.index_select(0, rows).mul_(b2).add_(_row_mean_sq(g), alpha=1 - b2)
        t = new_steps.double()
        bc2 = (1 - b2 ** t).float()                                 # [U]
        p.sub_(g * (lr / ((rv / bc2).sqrt() + eps)).unsqueeze(1))
        plan.new_state = {"row_v": rv}
    return plan


def optimizer_overhead(kind: str, d_v: int, value_dtype: str = "bfloat16") -> float:
    """Optimizer bytes over value bytes for a table of rows of d_v values under `kind` (a
    row's step count included; flat keys' state not: see ShardState.memory for a live shard)."""
    return state_bytes_per_row(kind, d_v) / (d_v * value_bytes_per_elem(value_dtype))
