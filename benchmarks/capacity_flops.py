"""Training FLOPs per token of the capacity models (issue 22), counted, not estimated.

Each model of a capacity run (benchmarks/capacity_train.py: its preset, and for the
knowledge models a table of n_sub^2 rows sized by the population) runs one training step's
forward and backward on one sequence of `seq_len` tokens on the CPU under
torch.utils.flop_counter.FlopCounterMode. What it counts: every matmul, batched matmul and
einsum, the attention (run on the math backend while counting, so it is two batched
matmuls over the whole S x S square: the causal half a fused kernel skips is counted too,
for every model alike), and on the knowledge models the store's in-process readout and its
backward (the reference kernels are einsums) and the product-key search's sub-key scores.
What it does not count: elementwise ops, norms, softmaxes, gathers, scatters, the
optimizers (AdamW and the table's row-wise Adam), all O(params) or O(tokens x k) and
no matmul. The MoE's routed experts are counted on the pairs routed (the CPU's loop
path), not on the GPU's padded block, whose zero rows the GPU multiplies too.

FLOPs per token do not depend on the tokens (k rows a head, K experts a token) nor on the
batch (a sequence's attention is its own), so random tokens of the vocabulary are used.
The result is device-independent; benchmarks/capacity.py puts it beside the bits stored
(bits per training FLOP, the training run's tokens x FLOPs per token) and the measured
tokens/s (achieved FLOP/s: how far a ~1M-parameter model sits from the card's peak).

    python -m benchmarks.capacity_flops --people 30000      # prints FLOPs per token per model
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.capacity_train import RunSpec, model_config, open_table  # noqa: E402
from model_worker.model import Transformer  # noqa: E402


def flops_per_token(spec: RunSpec) -> dict:
    """{forward, train (forward + backward), knowledge_layers (their share of train), params}
    per token of `spec`'s model, on the CPU (spec.device is ignored)."""
    # (imported here: torch's flop counter imports Triton, which decides at its import whether
    # it interprets, and importing this module should not make that choice for its importer)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    spec = RunSpec(**{**spec.__dict__, "device": "cpu", "remote": False, "batch_size": 1})
    mcfg = model_config(spec, spec.vocab)
    # (a throwaway model: the caller's random stream is left where it was)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="capacity_flops_") as work:
        torch.manual_seed(spec.seed)
        tables = open_table(spec, mcfg, Path(work), None) if mcfg.knowledge else contextlib.nullcontext()
        with tables as table:
            model = Transformer(mcfg, table).train()
            tokens = torch.randint(0, spec.vocab, (1, spec.seq_len + 1))
            with sdpa_kernel(SDPBackend.MATH):
                # one counter over forward and backward, so that backward ops are put down to
                # the module whose forward made them; the forward alone counted on its own
                with FlopCounterMode(display=False) as step:
                    _, loss = model(tokens[:, :-1], tokens[:, 1:])
                    (loss + model.aux_loss()).backward()
                with torch.no_grad(), FlopCounterMode(display=False) as fwd:
                    model(tokens[:, :-1], tokens[:, 1:])
            params = model.count_params()
    return {"forward": fwd.get_total_flops() / spec.seq_len, "train": step.get_total_flops() / spec.seq_len,
            "knowledge_layers": _module_flops(step, "knowledge") / spec.seq_len, "params": params}


def _module_flops(counter, part: str) -> int:
    """FLOPs counted inside modules whose own name (the last part of the path) starts with
    `part`, outermost ones only (their children's counts are already in theirs)."""
    counts = counter.get_flop_counts()
    hits = [m for m in counts if m.split(".")[-1].startswith(part)]
    outer = [m for m in hits if not any(m != o and m.startswith(o + ".") for o in hits)]
    return sum(sum(counts[m].values()) for m in outer)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.capacity import PRESETS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=30_000)
    ap.add_argument("--size", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--models", default="dense,dense_gelu,moe,knowledge,knowledge_dense")
    args = ap.parse_args(argv)
    out = {m: flops_per_token(RunSpec(model=m, preset=PRESETS[args.size][m], people=args.people, seed=0))
           for m in args.models.split(",")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
