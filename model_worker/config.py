"""Model configuration: one dataclass per module, named presets in a plain dict.

The same `ModelConfig` yields the three baselines we compare (DESIGN.md section 1):
dense (`ffn="dense"`), MoE (`ffn="moe"`) and MoE + knowledge (`knowledge=...`).
A size is one word: `preset("small-knowledge")`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(multiple * round(x / multiple)))


READOUT_MODES = ("pushdown", "fetch", "auto")


@dataclass
class KnowledgeConfig:
    """A knowledge layer (DESIGN.md section 2): h query heads over one shared table."""
    layers: tuple[int, ...] = (1,)   # which blocks carry a knowledge layer
    placement: str = "replace"       # "replace" the block's FFN, or sit "beside" it (summed, same input)
    n_heads: int = 4                 # h query heads; heads share the table
    d_k: int = 32                    # query / key width (split in two halves for product keys)
    d_v: int = 0                     # value width; 0 -> d_model
    k: int = 16                      # rows read out per head per token
    tau: float = 1.0                 # softmax temperature over the top-k scores
    n_sub: int = 32                  # sub-keys per codebook: the product segment has n_sub**2 rows
    readout: str = "pushdown"        # "pushdown": the shards compute the readout (moves [T, d_v] partial sums);
                                     # "fetch": the worker computes it from the U distinct rows it selected
                                     # (moves [U, d_v] rows); "auto": fetch when U <= T, per call
    output_gate: bool = True         # y = W_o r * silu(W_g x) (a SiLU gate on the layer's output)
    qk_norm: bool = True             # q = RMSNorm(W_q x); codebooks initialised on the unit sphere
    bias_update_rate: float = 1e-3   # product sub-key balancing (loss-free, selection only); 0 = off
    value_lr: float = 1e-2           # the store's sparse optimizer lr for rows (used when building a table)
    value_init_std: float = 0.0      # 0 -> d_v ** -0.5
    gate_pool: int = 8               # with gated rows in the table: flat candidates per query = gate_pool x k,
                                     # so that closed gated rows do not crowd open ones out of the search
    detector_pool: int = 32          # with detectors in the table: the best detectors per query whose scores
                                     # count as evidence (gating.py)

    def __post_init__(self):
        self.layers = tuple(int(i) for i in self.layers)
        if self.placement not in ("replace", "beside"):
            raise ValueError(f"placement must be 'replace' or 'beside', got {self.placement!r}")
        if self.readout not in READOUT_MODES:
            raise ValueError(f"readout must be one of {', '.join(READOUT_MODES)}; got {self.readout!r}")
        if self.d_k % 2:
            raise ValueError(f"d_k must be even (two product-key halves), got {self.d_k}")
        if self.gate_pool < 1:
            raise ValueError(f"gate_pool must be >= 1, got {self.gate_pool}")
        if self.detector_pool < 1:
            raise ValueError(f"detector_pool must be >= 1, got {self.detector_pool}")
        if self.k > self.n_sub ** 2:
            raise ValueError(f"k={self.k} exceeds the product segment's {self.n_sub ** 2} rows")

    @property
    def num_product_rows(self) -> int:
        return self.n_sub ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KnowledgeConfig":
        """From a dict (a checkpoint's meta.json, overrides), old key names included."""
        return cls(**{RENAMED_KNOWLEDGE_KEYS.get(k, k): v for k, v in d.items()})


# KnowledgeConfig keys renamed since checkpoints were first written (old -> new): "gate"
# named the output's SiLU gate, the rows' gate labels and the MoE router at once.
RENAMED_KNOWLEDGE_KEYS = {"gate": "output_gate"}


@dataclass
class ModelConfig:
    vocab_size: int = 260
    block_size: int = 128            # longest sequence (rotary table and KV cache length)
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    head_dim: int = 0                # 0 -> d_model // n_heads
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    ffn: str = "dense"               # "dense" | "moe"
    d_ff: int = 0                    # dense SwiGLU hidden width; 0 -> 8/3 d_model rounded
    mlp: str = "swiglu"              # the dense FFN: "swiglu" (LLaMA's gated MLP) or "gelu" (GPT-2's, no gate; at
                                     # 1.5x the width it holds the same parameters). Allen-Zhu and Li 2024 find the
                                     # gated MLP stores less knowledge than GPT-2's at 100 exposures.

    # MoE (ffn == "moe"): n_shared shared experts + n_experts routed, n_active of them per token.
    n_experts: int = 8
    n_active: int = 2
    n_shared: int = 1
    d_expert: int = 0                # 0 -> d_ff // (n_active + n_shared): the active FFN width equals the dense one
    router: str = "sigmoid"          # the router's expert scores: "sigmoid" (DeepSeek-V3) or "softmax"
    route_norm: bool = True          # normalise the selected experts' routing weights to sum to 1
    moe_bias_rate: float = 1e-3      # loss-free balancing step (0 = off)
    aux_loss_coef: float = 0.0       # optional sequence-level balance loss (DeepSeek-V3 uses ~1e-4)
    moe_grouped_bf16: bool = False   # routed experts as bf16 grouped GEMMs (torch._grouped_mm): faster
                                     # on sm90, not the fp32 numerics (model_worker/moe.py)

    knowledge: KnowledgeConfig | None = None

    def __post_init__(self):
        if isinstance(self.knowledge, dict):
            self.knowledge = KnowledgeConfig.from_dict(self.knowledge)
        if self.ffn not in ("dense", "moe"):
            raise ValueError(f"ffn must be 'dense' or 'moe', got {self.ffn!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.mlp == "gelu" and self.ffn != "dense":
            raise ValueError("mlp='gelu' is the dense FFN's; the MoE's experts are SwiGLU")
        if self.router not in ("sigmoid", "softmax"):
            raise ValueError(f"router must be 'sigmoid' or 'softmax', got {self.router!r}")
        if self.head_dim == 0:
            assert self.d_model % self.n_heads == 0, "d_model must divide into heads"
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff == 0:
            self.d_ff = _round_to(8 * self.d_model / 3, 16)
        if self.d_expert == 0:
            self.d_expert = max(8, self.d_ff // (self.n_active + self.n_shared))
        if self.n_active > self.n_experts:
            raise ValueError("n_active must not exceed n_experts")
        if self.knowledge is not None:
            if self.knowledge.d_v == 0:
                self.knowledge.d_v = self.d_model
            bad = [i for i in self.knowledge.layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"knowledge layers {bad} outside [0, {self.n_layers})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Presets. "tiny-*" are for tests (seconds on a CPU); "small-*" for the CPU quality
# benchmark (minutes per run). Within "small" the baselines are matched in active
# parameters per token (model.count_params): the knowledge layer sits beside the FFN
# of block 2, so the dense and MoE baselines get a wider FFN (d_ff 208 vs 176) to
# match; small-dense-2x has twice the knowledge model's active parameters.
_TINY = dict(vocab_size=260, block_size=64, n_layers=2, d_model=32, n_heads=2)
_SMALL = dict(vocab_size=260, block_size=128, n_layers=4, d_model=64, n_heads=4)
_TINY_KN = dict(layers=(1,), n_heads=2, d_k=16, k=4, n_sub=8)
_SMALL_KN = dict(layers=(2,), placement="beside", n_heads=2, d_k=32, k=16, n_sub=64, value_lr=0.05)

_CAP = dict(vocab_size=2048, block_size=256, n_layers=4, d_model=128, n_heads=4)
_CAP_KN = dict(layers=(2,), placement="beside", n_heads=4, d_k=32, k=16, n_sub=256, value_lr=0.05)
_CAP4M = dict(_CAP, d_model=256)
_CAP_TINY = dict(vocab_size=1024, block_size=128, n_layers=2, d_model=64, n_heads=4)
_CAP_TINY_KN = dict(layers=(1,), placement="beside", n_heads=2, d_k=32, k=16, n_sub=64, value_lr=0.05)

# The data-plane model (issue 21, benchmarks/wire_bench.py --phases train): d_model and d_v
# 1024, two knowledge layers (beside the FFNs of blocks 1 and 2 of 4) sharing one table of
# 2048^2 = 4,194,304 rows, 1 head, k 8, read in fetch mode: at ~16k tokens a step (64 x 256)
# each layer selects up to 131k rows, about 100k+ distinct ones (~250 MB of bf16 rows).
_D1024 = dict(vocab_size=260, block_size=256, n_layers=4, d_model=1024, n_heads=8, ffn="moe", n_experts=8,
              n_active=2)
_D1024_KN = dict(layers=(1, 2), placement="beside", n_heads=1, d_k=128, k=8, n_sub=2048, readout="fetch",
                 value_lr=0.05)
# Its CPU smoke shape (tests/benchmarks/test_wire_bench.py): the same structure, tiny.
_D1024_TINY = dict(vocab_size=260, block_size=64, n_layers=3, d_model=32, n_heads=2, ffn="moe", n_experts=4,
                   n_active=2)
_D1024_TINY_KN = dict(layers=(1, 2), placement="beside", n_heads=1, d_k=16, k=8, n_sub=32, readout="fetch",
                      value_lr=0.05)

configs: dict[str, dict[str, Any]] = {
    "tiny-dense": dict(_TINY, ffn="dense"),
    "tiny-moe": dict(_TINY, ffn="moe", n_experts=4, n_active=2),
    "tiny-knowledge": dict(_TINY, ffn="moe", n_experts=4, n_active=2, knowledge=_TINY_KN),
    "small-dense": dict(_SMALL, ffn="dense", d_ff=208),                      # ~242k active
    "small-dense-2x": dict(_SMALL, ffn="dense", n_layers=8, d_ff=224),       # ~490k active
    "small-moe": dict(_SMALL, ffn="moe", d_ff=208, n_experts=16, n_active=2),  # ~245k active
    "small-knowledge": dict(_SMALL, ffn="moe", d_ff=176, n_experts=16, n_active=2, knowledge=_SMALL_KN),  # ~241k
    # The quality benchmark's knowledge model: knowledge layers beside the FFNs of blocks 1
    # and 2, both reading the one table (as the memory-layers paper shares one memory over
    # several layers); the narrower d_ff pays for the second layer's projections (~243k
    # active with the benchmark's 16k-row table).
    "small-knowledge-2l": dict(_SMALL, ffn="moe", d_ff=144, n_experts=16, n_active=2,
                               knowledge=dict(_SMALL_KN, layers=(1, 2))),
    # Knowledge capacity (benchmarks/capacity.py, issue 22): bioS biographies through a
    # 2,048-token BPE (vocab_size and the table's n_sub are set per run: n_sub grows with
    # the population). Matched at ~1.05M active parameters; the dense model's capacity (~1
    # bit per parameter at 100 exposures, ~1M bits) is what ~23k people carry, well below
    # the largest populations (300k people: 14M bits). The knowledge layer sits beside
    # the FFN of block 2; d_ff 272 pays for its projections. The experts' width is a multiple
    # of 8 (d_ff // 3 would give 117 and 90): an odd inner width leaves the expert matmuls'
    # rows 4-byte aligned, which keeps cuBLAS off its tensor-core (TF32) kernels and off bf16
    # grouped GEMMs. 120 and 96 round up, so the MoE models carry slightly more active
    # parameters than the dense one (1.087M and 1.094M against 1.066M), never fewer.
    "cap-dense": dict(_CAP, ffn="dense", d_ff=352),                                     # ~1.07M active
    "cap-dense-gelu": dict(_CAP, ffn="dense", mlp="gelu", d_ff=528),                    # ~1.07M: GPT-2's MLP
    "cap-moe": dict(_CAP, ffn="moe", d_ff=352, d_expert=120, n_experts=16, n_active=2),  # ~1.08M / 3.7M
    "cap-knowledge": dict(_CAP, ffn="moe", d_ff=272, d_expert=96, n_experts=16, n_active=2,
                          knowledge=_CAP_KN),                                            # ~1.09M
    "cap-knowledge-dense": dict(_CAP, ffn="dense", d_ff=272, knowledge=_CAP_KN),        # ~1.05M: the store without MoE
    # The same five at ~4M active parameters (d_model 256, d_v 256; the upper size):
    # where a step does ~3.4x the matmul work a launch (27.0M FLOPs a training token against
    # 7.96M: benchmarks/capacity_flops.py), for tokens/s against model size.
    "cap4m-dense": dict(_CAP4M, ffn="dense", d_ff=784),                                 # ~3.98M active
    "cap4m-dense-gelu": dict(_CAP4M, ffn="dense", mlp="gelu", d_ff=1176),               # ~3.98M
    "cap4m-moe": dict(_CAP4M, ffn="moe", d_ff=784, d_expert=264, n_experts=16, n_active=2),  # ~4.02M
    "cap4m-knowledge": dict(_CAP4M, ffn="moe", d_ff=672, d_expert=224, n_experts=16, n_active=2,
                            knowledge=_CAP_KN),                                          # ~4.04M
    "cap4m-knowledge-dense": dict(_CAP4M, ffn="dense", d_ff=672, knowledge=_CAP_KN),    # ~4.02M
    # Their CPU check at small N: ~160k active (1,024-token BPE).
    "cap-tiny-dense": dict(_CAP_TINY, ffn="dense", d_ff=192),
    "cap-tiny-dense-gelu": dict(_CAP_TINY, ffn="dense", mlp="gelu", d_ff=288),
    "cap-tiny-moe": dict(_CAP_TINY, ffn="moe", d_ff=192, n_experts=8, n_active=2),
    "cap-tiny-knowledge": dict(_CAP_TINY, ffn="moe", d_ff=144, n_experts=8, n_active=2, knowledge=_CAP_TINY_KN),
    "cap-tiny-knowledge-dense": dict(_CAP_TINY, ffn="dense", d_ff=144, knowledge=_CAP_TINY_KN),
    "d1024": dict(_D1024, knowledge=_D1024_KN),
    "d1024-tiny": dict(_D1024_TINY, knowledge=_D1024_TINY_KN),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """`preset("tiny-knowledge", d_model=64)` -> a fresh ModelConfig."""
    if name not in configs:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(configs)}")
    kw = dict(configs[name])
    kn = overrides.pop("knowledge", kw.pop("knowledge", None))
    kw.update(overrides)
    if isinstance(kn, dict):
        kn = KnowledgeConfig.from_dict(kn)
    elif isinstance(kn, KnowledgeConfig):
        kn = replace(kn)
    return ModelConfig(**kw, knowledge=kn)
