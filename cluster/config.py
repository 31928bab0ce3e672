"""Cluster configuration: which actors, where, with what resources.

Loaded from a TOML or JSON file (`kstore up --config cluster.toml`); every
field has a default that runs an embedded one-machine cluster.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class ShardResources:
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    memory_mb: int = 0              # 0: let Ray decide
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"store": 1}

    def ray_options(self) -> dict:
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb:
            opts["memory"] = self.memory_mb * 1024 * 1024
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts


@dataclass
class ClusterConfig:
    store_root: str = "store_data"
    num_shards: int = 2
    num_workers: int = 1
    admin_token: str = "kstore-dev-token"
    ray_address: str = ""           # "" embeds a local cluster; "auto" joins a running one
    shard: ShardResources = field(default_factory=ShardResources)
    worker: ShardResources = field(default_factory=lambda: ShardResources(num_cpus=1.0))
    model_preset: str = "tiny-knowledge"   # model_worker.config.configs (the table is made for it)
    corpus_preset: str = "tiny"            # model_worker.data.CORPUS_PRESETS
    train_steps: int = 300
    seed: int = 0

    @staticmethod
    def load(path: str | Path | None) -> "ClusterConfig":
        if path is None:
            return ClusterConfig()
        text = Path(path).read_text()
        raw = tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text)
        return ClusterConfig.from_dict(raw)

    @staticmethod
    def from_dict(raw: dict) -> "ClusterConfig":
        known = {f.name for f in fields(ClusterConfig)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown cluster config keys: {sorted(unknown)}; known: {sorted(known)}")
        raw = dict(raw)
        for key in ("shard", "worker"):
            if key in raw:
                raw[key] = ShardResources(**raw[key])
        return ClusterConfig(**raw)

    def to_dict(self) -> dict:
        return asdict(self)
