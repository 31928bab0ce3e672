"""Argument types the `kstore` verbs share (cli.py, cli_knowledge.py)."""
from __future__ import annotations

import argparse


class CliError(Exception):
    """What went wrong and what to do, in one line. `kstore` prints it and exits with
    code 2 (a traceback only with -v)."""


def parse_ids(spec: str):
    """'3,7,10:20' -> int64 tensor [3, 7, 10, ..., 19]."""
    import torch  # deferred, as everywhere in the CLI: `kstore --help` starts without loading torch
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            lo, hi = part.split(":")
            out.extend(range(int(lo), int(hi)))
        else:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError(f"no ids in {spec!r}")
    return torch.tensor(out, dtype=torch.int64)


def step_shards(spec: str) -> tuple[int, int]:
    """'200:4' -> (200, 4): re-partition onto 4 shards after step 200."""
    try:
        step, shards = spec.split(":")
        return int(step), int(shards)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEP:SHARDS, e.g. 200:4; got {spec!r}") from None
