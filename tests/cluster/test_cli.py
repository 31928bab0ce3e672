"""The `kstore` command line: parsing, help for every verb, config files, and
a clear exit when no cluster is running."""
from __future__ import annotations

import argparse
import os
import re
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


def _kstore(*argv, cwd=None, timeout=300):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout
    return subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_the_default_cluster_config_names_presets_that_exist():
    from model_worker.config import configs
    from model_worker.data.corpus_config import CORPUS_PRESETS
    cfg = ClusterConfig()
    assert cfg.model_preset in configs and configs[cfg.model_preset].get("knowledge")
    assert cfg.corpus_preset in CORPUS_PRESETS


def test_errors_are_one_line_with_exit_code_2_and_a_traceback_only_with_v(tmp_path):
    state = str(tmp_path / "none.json")
    out = _kstore("--state", state, "admin", "stats")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "kstore up" in out.stderr
    out = _kstore("--state", state, "-v", "admin", "stats")
    assert out.returncode == 2 and "Traceback" in out.stderr and "kstore up" in out.stderr.splitlines()[-1]
    bad = tmp_path / "c.toml"
    bad.write_text('model_preset = "tiny_knowledge"\n')
    out = _kstore("--state", state, "up", "--config", str(bad))     # refused before anything starts
    assert out.returncode == 2 and "unknown model preset 'tiny_knowledge'" in out.stderr
    assert "tiny-knowledge" in out.stderr and "Traceback" not in out.stderr and out.stdout == ""


def _options(module_argv: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, "-m", *module_argv, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


@pytest.mark.parametrize("verb", ["train", "generate"])
def test_kstore_train_and_generate_take_the_module_flags(verb):
    module = _options([f"model_worker.{verb}"])
    kstore = _options(["cluster.cli", verb])
    assert "--checkpoint" in module or "--out-dir" in module
    assert module <= kstore and kstore - module <= {"--local", "--scale-at"}


def test_generate_without_a_cluster_answers_as_the_module_does(tmp_path):
    from model_worker.train import TrainConfig, train
    train(TrainConfig(model="tiny-knowledge", steps=3, eval_every=0, ckpt_every=3, progress=False,
                      out_dir=str(tmp_path / "run")))
    argv = ["--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "4", "--show-rows", "The capital of Peru is"]
    module = subprocess.run([sys.executable, "-m", "model_worker.generate", *argv], capture_output=True, text=True)
    kstore = _kstore("--state", str(tmp_path / "none.json"), "generate", *argv)
    assert module.returncode == 0 and kstore.returncode == 0, kstore.stderr
    assert kstore.stdout == module.stdout and "layer 1: rows" in module.stdout
    assert "in this process" in kstore.stderr


@pytest.mark.slow
def test_a_failed_up_leaves_nothing_running(tmp_path):
    # The store root takes the cluster's token file, but a file stands where the store stages
    # its first version: the Ray head is up by the time the store fails.
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "staging").write_text("a file where the staging directory should be")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'store_root = "{tmp_path / "store"}"\n')
    out = _kstore("up", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    pid = int(re.search(r"\(pid (\d+)\)", out.stdout).group(1))     # the head started, then the store failed
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                                           # ... and the head is gone
    assert not (tmp_path / ".kstore" / "cluster.json").exists()


@pytest.mark.slow
def test_a_second_up_says_so_and_down_stops_the_head(tmp_path):
    first = _kstore("up", cwd=tmp_path)
    try:
        assert first.returncode == 0, first.stderr
        pid = int(re.search(r"\(pid (\d+)\)", first.stdout).group(1))
        second = _kstore("up", cwd=tmp_path)
        assert second.returncode == 2 and "already up" in second.stderr and "kstore down" in second.stderr
        assert "Traceback" not in second.stderr and "started a Ray head" not in second.stdout
    finally:
        down = _kstore("down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
