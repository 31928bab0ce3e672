"""Cluster configuration: which actors, where, with what resources.

Loaded from a TOML or JSON file (`kstore up --config cluster.toml`); every
field has a default that runs an embedded one-machine cluster.

Credentials: there is no default token. Unless the config names an admin_token, the
cluster's tokens (read, train, admin; store_service/auth.py) are generated on first use
into `token_file` (default <store_root>/kstore_tokens.json, mode 0600) and read from
there by every later command and client.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


ROWS_PLACES = ("auto", "gpu", "host")


@dataclass
class ShardResources:
    num_cpus: float = 0.5
    num_gpus: float = 0.0           # fractions share a GPU between shard actors
    memory_mb: int = 0              # 0: let Ray decide
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"store": 1}
    # Where a shard actor keeps its rows (cluster/shard_actor.py, rows_device): "gpu" the
    # GPU Ray gave it (needs num_gpus > 0), "host" host memory (page-locked where CUDA
    # exists, serving GPU workers by asynchronous copies), "auto" the GPU when Ray gave it
    # one that CUDA can use, else host memory. Workers ignore it.
    rows: str = "auto"

    def __post_init__(self):
        if self.rows not in ROWS_PLACES:
            raise ValueError(f"rows must be one of {ROWS_PLACES}, got {self.rows!r}")
        if self.rows == "gpu" and not self.num_gpus > 0:
            raise ValueError("rows = \"gpu\" needs num_gpus > 0 (Ray gives the actor its GPU)")

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
    admin_token: str = ""           # "": the admin token of token_file (generated on first use)
    token_file: str = ""            # "": <store_root>/kstore_tokens.json
    ray_address: str = ""           # "" embeds a local cluster; "auto" joins a running one
    shard: ShardResources = field(default_factory=ShardResources)
    # per shard id ("0", "1", ...): fields of `shard` to change for that shard, e.g.
    # {"0": {"num_gpus": 0.5, "rows": "gpu"}, "1": {"rows": "host"}}
    shard_overrides: dict[str, dict] = field(default_factory=dict)
    worker: ShardResources = field(default_factory=lambda: ShardResources(num_cpus=1.0))
    model_preset: str = "tiny-knowledge"   # model_worker.config.configs (the table is made for it)
    corpus_preset: str = "tiny"            # model_worker.data.CORPUS_PRESETS
    train_steps: int = 300
    seed: int = 0

    @staticmethod
    def load(path: str | Path | None) -> "ClusterConfig":
        if path is None:
            return ClusterConfig().ensure_tokens()
        text = Path(path).read_text()
        raw = tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text)
        return ClusterConfig.from_dict(raw).ensure_tokens()

    def token_path(self) -> str:
        return self.token_file or os.path.join(self.store_root, "kstore_tokens.json")

    def tokens(self):
        """The cluster's tokens (store_service.auth.Tokens): the token file's, made on first
        use; a config naming admin_token uses that one token for every role."""
        from store_service.auth import Tokens, load_or_create_token_file
        if self.admin_token and not os.path.exists(self.token_path()):
            return Tokens(admin=self.admin_token)
        tokens = load_or_create_token_file(self.token_path())
        if self.admin_token and self.admin_token != tokens.admin:
            return Tokens(admin=self.admin_token)
        return tokens

    def ensure_tokens(self) -> "ClusterConfig":
        """Fill admin_token from the token file (generating it when missing); returns self."""
        if not self.admin_token:
            self.admin_token = self.tokens().admin
        return self

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

    def __post_init__(self):
        for key, fields_ in self.shard_overrides.items():
            if not str(key).isdigit():
                raise ValueError(f"shard_overrides keys are shard ids, got {key!r}")
            self.shard_resources(int(key))   # validates the merged fields

    def shard_resources(self, shard_id: int) -> ShardResources:
        """The resources and rows placement of shard `shard_id` (`shard`, with its override)."""
        over = self.shard_overrides.get(str(shard_id))
        return ShardResources(**{**asdict(self.shard), **over}) if over else self.shard

    def to_dict(self) -> dict:
        """The config as data; a token that comes from the token file stays there (a state
        file written from this holds no credential)."""
        d = asdict(self)
        if self.admin_token and os.path.exists(self.token_path()):
            from store_service.auth import read_token_file
            if read_token_file(self.token_path()).admin == self.admin_token:
                d["admin_token"] = ""
        return d
