"""The `kstore` command line: parsing, help for every verb, config files, and
a clear exit when no cluster is running."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from cluster.cli import build_parser
from cluster.cli_args import parse_ids, step_shards
from cluster.config import ClusterConfig


def test_parse_ids_ranges_and_lists():
    assert torch.equal(parse_ids("3,7,10:13"), torch.tensor([3, 7, 10, 11, 12]))
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ids(" , ")


def test_step_shards():
    assert step_shards("200:4") == (200, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="STEP:SHARDS"):
        step_shards("200")


@pytest.mark.parametrize("argv", [
    ["demo", "--steps", "10"], ["up", "--config", "c.toml"], ["status"], ["down"], ["scale", "4"],
    ["train", "--steps", "5", "--scale-at", "2:3"], ["generate", "--checkpoint", "x", "q?"],
    ["admin", "snapshot"], ["admin", "swap", "--version", "3", "--shard", "1"],
    ["admin", "add-rows", "--count", "5"], ["admin", "ablate", "--ids", "1:4"], ["admin", "stats"],
])
def test_every_verb_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.fn)


def test_help_teaches_every_command():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("demo", "up", "status", "train", "generate", "admin", "scale", "down",
                 "learn", "explain", "ablate", "usage", "reorder"):
        assert verb in out.stdout
    assert "bench" not in out.stdout          # benchmarks run on their own: python -m benchmarks.X


def test_cluster_config_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('num_shards = 3\n[shard]\nnum_cpus = 1.5\ncustom = {store = 1}\n')
    cfg = ClusterConfig.load(p)
    assert cfg.num_shards == 3 and cfg.shard.ray_options() == {"num_cpus": 1.5, "num_gpus": 0.0,
                                                                 "resources": {"store": 1}}
    p.write_text("num_shard = 3\n")
    with pytest.raises(ValueError, match="unknown cluster config keys"):
        ClusterConfig.load(p)


def test_commands_without_a_cluster_exit_with_a_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--state", str(tmp_path / "none.json"), "status"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "kstore up" in out.stderr
