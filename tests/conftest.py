"""Shared test fixtures. Test modules never import each other: what two of them share lives here."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton decides at its import whether it interprets (TRITON_INTERPRET) or compiles, and a
# module of torch may import it first (torch.utils.flop_counter does, for benchmarks/
# capacity_flops.py): on a machine without CUDA, where Triton only ever interprets (the
# kernel tests), it is switched on before any test module can import Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.utils._python_dispatch import TorchDispatchMode

from model_worker.model import Transformer
from model_worker.reading import LayerRead
from model_worker.train import TrainConfig, create_table, model_config
from store_service import kernels
from store_service.interface import (SEGMENT_FLAT, SEGMENT_PRODUCT, SearchResult, SegmentInfo, ShardInfo, TableInfo,
                                     UsageStats)

# ============================================================================================
# Host syncs (test_moe, test_knowledge_layer, test_shard): counted on the CPU
# ============================================================================================

class HostWaits(TorchDispatchMode):
    """Counts, by op name, the ops that make the host wait for a GPU when they run on one:
    reads of a value (item, bool, int, float), boolean-mask indexing, nonzero, unique and
    bincount (on CUDA it reads its input's min and max). Run on the CPU, where they wait for
    nothing, it finds them all the same. (.tolist() and .cpu() run no op on a CPU tensor: not seen.)"""
    READS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "bincount",
             "masked_select"}

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            name += "[bool]"
        elif name not in self.READS:
            name = None
        if name:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_waits():
    """host_waits() -> a HostWaits mode: `with mode: ...`, then mode.count / mode.ops."""
    return HostWaits


# ============================================================================================
# Model side (test_model, test_knowledge_layer, test_gates, test_detectors, test_continual,
# test_interpret, test_knobs): tables held in tensors, tiny knowledge models, gate helpers
# ============================================================================================


class TensorTable:
    """A KnowledgeTable held in plain tensors: product rows [0, n^2) then flat
    rows. Row and key gradients are accumulated in `value_grad` / `key_grad`."""

    def __init__(self, d_k: int, d_v: int, n_sub: int, n_flat: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d_k, self.d_v, self.n_sub, self.n_flat = d_k, d_v, n_sub, n_flat
        self.P = n_sub * n_sub
        self.N = self.P + n_flat
        self.values = torch.randn(self.N, d_v, generator=g)
        self.flat_keys = torch.randn(n_flat, d_k, generator=g)
        self.flat_bias = torch.randn(n_flat, generator=g) * 0.01
        self.ablated = torch.zeros(self.N, dtype=torch.bool)
        self.value_grad = torch.zeros_like(self.values)
        self.key_grad = torch.zeros_like(self.flat_keys)

    def info(self) -> TableInfo:
        segs = [SegmentInfo(SEGMENT_PRODUCT, 0, self.P, self.n_sub)]
        if self.n_flat:
            segs.append(SegmentInfo(SEGMENT_FLAT, self.P, self.n_flat))
        return TableInfo(self.d_k, self.d_v, self.N, "float32", tuple(segs), (ShardInfo(0, 0, self.N, 1, 0),))

    def search(self, queries, k, **kw):
        s = queries @ self.flat_keys.T + self.flat_bias
        s = s.masked_fill(self.ablated[self.P:], float("-inf"))
        scores, idx = s.topk(min(k, self.n_flat), dim=-1)
        return SearchResult(idx + self.P, scores, self.flat_keys[idx])

    def fetch(self, ids, *, hits=None, weight_sum=None, device=None):
        return self.values[ids].to(device or ids.device)

    def readout(self, ids, weights):
        return kernels.readout_weighted(self.values, ids, weights)

    def readout_backward(self, ids, weights, grad_out, *, request_id=""):
        gw, uniq, rg = kernels.readout_weighted_backward(self.values, ids, weights, grad_out)
        self.value_grad.index_add_(0, uniq, rg)
        return gw

    def accumulate_key_grads(self, ids, grads, *, request_id=""):
        self.key_grad.index_add_(0, ids - self.P, grads)

    def accumulate_value_grads(self, ids, grads, *, request_id=""):
        self.value_grad.index_add_(0, ids, grads)

    def usage(self):
        z = torch.zeros(self.N)
        return UsageStats(z.long(), z.double(), torch.zeros(self.N, dtype=torch.bool), self.ablated.clone())

    def end_step(self, step, **kw):
        return step + 1


@pytest.fixture
def tensor_table():
    """The TensorTable class: tensor_table(d_k, d_v, n_sub, n_flat=0, seed=0)."""
    return TensorTable


@pytest.fixture
def tiny_knowledge(tmp_path):
    """make(**train_config) -> (model, table): the tiny-knowledge preset (block size 128)
    over an in-process table under tmp_path/store, model initialised with seed 0, in
    train mode (nn.Module's default)."""
    def make(**kw):
        cfg = TrainConfig(model="tiny-knowledge", model_overrides={"block_size": 128}, out_dir=str(tmp_path), **kw)
        mcfg = model_config(cfg, 260)
        table = create_table(mcfg, cfg, str(tmp_path / "store"))
        torch.manual_seed(0)
        return Transformer(mcfg, table), table
    return make


class GateLab:
    """A tiny-knowledge model's knowledge layer over a fresh table (no block_size override),
    and how the gate tests look at what it selects."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    def model(self):
        """-> (model in eval mode, table)."""
        cfg = TrainConfig(model="tiny-knowledge", out_dir=str(self.tmp_path))
        mcfg = model_config(cfg, 260)
        table = create_table(mcfg, cfg, str(self.tmp_path / "store"))
        torch.manual_seed(0)
        return Transformer(mcfg, table).eval(), table

    def layer(self):
        """-> (the model's knowledge layer, table)."""
        model, table = self.model()
        return model.knowledge_layers()[0], table

    @staticmethod
    def queries(kl, x: torch.Tensor) -> torch.Tensor:
        """The layer's queries over x [B, S, D] -> [B, S, h, d_k]."""
        B, S, _ = x.shape
        return kl.q_norm(kl.wq(x).view(B, S, kl.n_heads, kl.d_k)).float().detach()

    @staticmethod
    def read(kl, x: torch.Tensor, **kw) -> LayerRead:
        """What the layer read over x (kw: the layer's per-call arguments)."""
        reads: list[LayerRead] = []
        kl(x, on_read=reads.append, **kw)
        return reads[0]

    @classmethod
    def selected(cls, kl, x: torch.Tensor, row: int, **kw) -> torch.Tensor:
        """[S] bool: some head of the position selects `row`."""
        return (cls.read(kl, x, **kw).ids[0] == row).any(-1).any(-1)

    @classmethod
    def full_and_stepwise(cls, kl, x: torch.Tensor, prompt: int, gates) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids the layer selects over x [1, S, D] in one call, and in a generation's calls
        carrying `gates` (a GateState): the first `prompt` positions, then one at a time."""
        full = cls.read(kl, x).ids
        parts = [cls.read(kl, x[:, :prompt], input_pos=torch.arange(prompt), gates=gates).ids]
        for t in range(prompt, x.shape[1]):
            parts.append(cls.read(kl, x[:, t:t + 1], input_pos=torch.tensor([t]), gates=gates).ids)
        return full, torch.cat(parts, 1)


@pytest.fixture
def gate_lab(tmp_path):
    return GateLab(tmp_path)


@pytest.fixture
def legacy_v1(tmp_path):
    """A copy of tests/data/legacy_v1 (what the pre-restructure code wrote: a learned
    checkpoint, its format-1 store version 2 with detectors, and that code's outputs) under
    tmp_path, the checkpoint's store_root pointing at the copy. -> the copy's directory."""
    dst = tmp_path / "legacy_v1"
    shutil.copytree(Path(__file__).parent / "data" / "legacy_v1", dst)
    meta_path = dst / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "store_root": str(dst / "store")}))
    return dst


# ============================================================================================
# Store side (test_hostile, test_auth, test_fuzz): one published shard served over real gRPC
# with a token per role, and raw stubs to send exactly what a hostile client would
# ============================================================================================


class HostileStore:
    """A one-shard table (16^2 product rows + 100 flat rows, d_k 16, d_v 32) published under
    `root`, its shard served in this process with read/train/admin tokens."""
    D_K, D_V = 16, 32

    def __init__(self, root: str, *, limits=None, tls=None, optimizer=None):
        import grpc
        from protos import knowledge_store_pb2_grpc as pb_grpc
        from store_service.auth import Tokens
        from store_service.config import OptimizerConfig, TableConfig
        from store_service.server import serve_shard
        from store_service.shard import Shard
        from store_service.table import Table

        self.root = root
        cfg = TableConfig(d_k=self.D_K, d_v=self.D_V, segments=[("product", 16), ("flat", 100)],
                          store_codebooks=True, num_shards=1,
                          optimizer=optimizer or OptimizerConfig("adam", lr=0.1))
        self.version = Table.create(cfg, root).snapshot()
        self.shard = Shard.load(root, self.version, 0)
        self.tokens = Tokens(admin="admin-tok", train="train-tok", read="read-tok")
        self.server = serve_shard(self.shard, tokens=self.tokens, limits=limits, tls=tls, metrics_port=0)
        self.channel = None if tls is not None else grpc.insecure_channel(self.server.address)
        if self.channel is not None:
            self.store = pb_grpc.KnowledgeStoreStub(self.channel)
            self.admin = pb_grpc.StoreAdminStub(self.channel)

    def md(self, role: str = "admin") -> tuple:
        return (("authorization", f"Bearer {getattr(self.tokens, role)}"),) if role else ()

    def observe(self) -> dict:
        """Everything observable about the shard, to check that a refused call changed nothing."""
        return dict(describe=self.shard.describe(), versions=self.shard.held_versions(),
                    state=self.shard.state_dict(), pending=self.shard._serving.pending_grad_bytes,
                    arrivals=dict(self.shard._serving.arrivals))

    def assert_unchanged(self, before: dict) -> None:
        after = self.observe()
        for key in ("describe", "versions", "pending", "arrivals"):
            assert after[key] == before[key], key
        assert after["state"].keys() == before["state"].keys()
        for name, t in before["state"].items():
            assert torch.equal(after["state"][name], t), name

    def expect(self, rpc, request, code, *, role: str = "admin", contains: str = "", timeout: float = 10.0):
        """Send `request`; it must fail with `code` (its text short and containing `contains`)
        and leave the shard as it was. -> the error."""
        import grpc
        before = self.observe()
        with pytest.raises(grpc.RpcError) as info:
            rpc(request, timeout=timeout, metadata=self.md(role))
        err = info.value
        assert err.code() == code, (err.code(), err.details())
        assert contains in (err.details() or ""), err.details()
        assert len(err.details() or "") <= 400
        self.assert_unchanged(before)
        return err

    def metrics_text(self) -> str:
        import urllib.request
        return urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=5).read().decode()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.server.stop(grace=None)


@pytest.fixture
def hostile(tmp_path):
    """A HostileStore under tmp_path with the default limits; factory `hostile.make(**kw)`
    for other limits or TLS (closed at the end too)."""
    made = []

    def make(sub: str = "other", **kw) -> HostileStore:
        s = HostileStore(str(tmp_path / sub), **kw)
        made.append(s)
        return s
    store = make("store")
    store.make = make
    yield store
    for s in made:
        s.close()


def self_signed_cert(directory, name: str = "server") -> tuple[str, str]:
    """A fresh self-signed certificate for localhost / 127.0.0.1 made with the openssl
    command line -> (cert.pem path, key.pem path)."""
    import subprocess
    cert, key = str(directory / f"{name}.crt"), str(directory / f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", f"/CN={name}", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def certs(tmp_path):
    """Self-signed certificates made for this test: a server's and a client's (mutual TLS)."""
    return {"server": self_signed_cert(tmp_path, "server"), "client": self_signed_cert(tmp_path, "client")}
