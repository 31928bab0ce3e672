"""A hostile client, for tests and benchmarks/reliability.py: discovers every RPC of a
server through server reflection and sends it malformed messages, with and without
credentials, judging each answer.

    h = HostileClient(address, token)
    cases = h.cases()                      # (method, field, attack class, request bytes), deterministic
    for case in cases: verdict = h.send(case, credentials=True)
    h.fuzz(seconds=2.0, seed=0)            # random combinations of attacks, bounded in time

An answer is *bad* when its status is UNKNOWN or INTERNAL, or when the server stops
answering its health check; a call without credentials that is not refused
UNAUTHENTICATED (public RPCs aside) is an *unauthenticated mutation* attempt that got
through. Everything else (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED ...)
is a clean refusal or a legitimate answer.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import grpc
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc

from . import auth, wire

BAD_CODES = ("UNKNOWN", "INTERNAL")
_SKIP_SERVICES = ("grpc.reflection", "grpc.health")

# Attack classes per field kind.
INT_ATTACKS = {"zero": 0, "negative": -1, "int64_max": 2 ** 63 - 1, "int64_min": -2 ** 63, "int32_over": 2 ** 31}
FLOAT_ATTACKS = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf, "huge": 1e308, "negative": -1.0,
                 "zero": 0.0, "denormal": 5e-324}
STR_ATTACKS = {"empty": "", "long_10k": "x" * 10_000, "nul": "a\x00b", "traversal": "../../etc/passwd",
               "absolute": "/proc/self/mem", "unicode": "\u202e\ufffd\U0001f600", "bogus": "float32"}
TENSOR_ATTACKS = ("nan_data", "inf_data", "huge_values", "shape_data_mismatch", "negative_dim", "huge_shape",
                  "bad_dtype", "wrong_rank", "empty", "wrong_dtype", "missing")


@dataclass(frozen=True)
class Case:
    method: str      # full gRPC method name
    field: str       # the field attacked ("<message>": the whole message)
    attack: str      # attack class
    payload: bytes   # the serialized request


def _set(target, t: torch.Tensor) -> None:
    """Fill a Tensor message of the reflected pool (its own class) from a tensor."""
    target.Clear()
    target.MergeFromString(wire.to_proto(t).SerializeToString())


class HostileClient:
    def __init__(self, address: str, token: str, *, timeout_s: float = 5.0, channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(address)
        self.token, self.timeout_s = token, timeout_s
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        self.streaming: set[str] = set()   # server-streaming methods (FetchStream), found by _discover
        self.methods = self._discover()
        self._health = health_pb2_grpc.HealthStub(self.channel)
        d = pb_grpc.KnowledgeStoreStub(self.channel).Describe(
            pb.DescribeRequest(), timeout=timeout_s, metadata=((auth.MD_AUTHORIZATION, auth.bearer(token)),))
        self.dims = (int(d.d_k), int(d.d_v))   # so the templates are well formed for this table

    # -- discovery ------------------------------------------------------------------
    def _discover(self) -> dict[str, object]:
        """Full method name -> input message descriptor, for every service reflection lists."""
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        out = {}
        for svc in resp.list_services_response.service:
            if svc.name.startswith(_SKIP_SERVICES):
                continue
            desc = self.pool.FindServiceByName(svc.name)
            for m in desc.methods:
                out[f"/{desc.full_name}/{m.name}"] = m.input_type
                if m.server_streaming:
                    self.streaming.add(f"/{desc.full_name}/{m.name}")
        return out

    def _cls(self, desc):
        return message_factory.GetMessageClass(desc)

    # -- messages -------------------------------------------------------------------
    def template(self, method: str):
        """A well-formed request of `method` (so an attack on one field reaches deep code)."""
        d_k, d_v = self.dims
        msg = self._cls(self.methods[method])()
        ids2, w2 = torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]])
        name = method.rsplit("/", 1)[-1]
        fill = {
            "Search": lambda m: (_set(m.queries, torch.randn(2, d_k)), setattr(m, "k", 3)),
            "Fetch": lambda m: _set(m.ids, torch.tensor([1, 2])),
            "Readout": lambda m: (_set(m.ids, ids2), _set(m.weights, w2)),
            "ReadoutBackward": lambda m: (_set(m.ids, ids2), _set(m.weights, w2),
                                          _set(m.grad_out, torch.ones(1, d_v))),
            "AccumulateValueGrads": lambda m: (_set(m.ids, torch.tensor([300])), _set(m.grads, torch.ones(1, d_v))),
            "AccumulateKeyGrads": lambda m: (_set(m.ids, torch.tensor([300])), _set(m.grads, torch.ones(1, d_k))),
            "EndStep": lambda m: (setattr(m, "num_workers", 1), setattr(m, "timeout_s", 1.0)),
            "AddRows": lambda m: (_set(m.values, torch.zeros(1, d_v)), _set(m.keys, torch.zeros(1, d_k))),
            "SetFrozen": lambda m: _set(m.ids, torch.tensor([1])),
            "SetAblated": lambda m: _set(m.ids, torch.tensor([1])),
            "SetOptimizer": lambda m: (setattr(m.optimizer, "kind", "sgd"), setattr(m.optimizer, "lr", 0.01)),
            "PrepareVersion": lambda m: setattr(m, "version", 1),
        }
        if method.startswith("/knowledge_store.v1.StoreTransport/"):
            # The bulk data path: the same requests inside a placement (a session the fuzz does
            # not hold, so a well-formed call ends at NOT_FOUND after its checks).
            inner = {"Fetch": "fetch", "Readout": "readout", "ReadoutBackward": "backward"}.get(name)
            if inner is not None:
                fill[name](getattr(msg, inner))
            elif name == "PushGrads":
                msg.kind = "value"
                _set(msg.ids, torch.tensor([300]))
                msg.grads.dtype, msg.grads.shape[:] = "float32", [1, d_v]
            return msg
        if name in fill:
            fill[name](msg)
        return msg

    def _attacks_on(self, field) -> list[tuple[str, object]]:
        """(attack class, value or callable(message field)) for one field descriptor."""
        fd = field
        if fd.message_type is not None and fd.message_type.name == "Tensor" and not _is_map(fd):
            return [(a, a) for a in TENSOR_ATTACKS]
        if fd.message_type is not None:
            return [("default_message", "default_message")] + ([("many_entries", "many_entries")]
                                                               if _is_map(fd) or _repeated(fd) else [])
        if _repeated(fd):
            return [("many_entries", "many_entries"), ("bad_entry", "bad_entry")]
        t = fd.type
        if t in (fd.TYPE_INT64, fd.TYPE_INT32, fd.TYPE_UINT64, fd.TYPE_UINT32, fd.TYPE_SINT64, fd.TYPE_SINT32):
            return [(k, v) for k, v in INT_ATTACKS.items() if not (t in (fd.TYPE_INT32, fd.TYPE_SINT32) and abs(v) > 2 ** 31 - 1)
                    and not (t in (fd.TYPE_UINT64, fd.TYPE_UINT32) and v < 0)]
        if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
            return list(FLOAT_ATTACKS.items())
        if t == fd.TYPE_STRING:
            return list(STR_ATTACKS.items())
        if t == fd.TYPE_BYTES:
            return [("random_bytes", bytes(random.Random(0).randbytes(64))), ("empty", b"")]
        if t == fd.TYPE_BOOL:
            return [("true", True)]
        return []

    def _apply(self, msg, fd, attack: str, value) -> None:
        if isinstance(value, str) and attack in TENSOR_ATTACKS and fd.message_type is not None:
            _attack_tensor(getattr(msg, fd.name), attack, msg, fd)
        elif attack == "default_message":
            if _is_map(fd):
                getattr(msg, fd.name)["x"]  # one entry, default value  # noqa: B018
            elif _repeated(fd):
                getattr(msg, fd.name).add()
            else:
                getattr(msg, fd.name).SetInParent()
        elif attack == "many_entries":
            target = getattr(msg, fd.name)
            if _is_map(fd):
                for i in range(100):
                    target[f"k{i}"]  # noqa: B018
            elif fd.message_type is not None:
                for _ in range(100):
                    target.add()
            else:
                target.extend([_scalar_default(fd)] * 10_000)
        elif attack == "bad_entry":
            target = getattr(msg, fd.name)
            target.append(STR_ATTACKS["long_10k"] if fd.type == fd.TYPE_STRING else _scalar_default(fd))
        else:
            setattr(msg, fd.name, value)

    def cases(self) -> list[Case]:
        """Every (method, field, attack class) on top of each method's well-formed template,
        plus malformed bytes for the whole message. Deterministic."""
        out = []
        for method, desc in sorted(self.methods.items(), key=lambda kv: kv[0]):
            for fd in desc.fields:
                for attack, value in self._attacks_on(fd):
                    msg = self.template(method)
                    self._apply(msg, fd, attack, value)
                    out.append(Case(method, fd.name, attack, msg.SerializeToString()))
            out.append(Case(method, "<message>", "garbage_bytes", bytes(random.Random(method).randbytes(97))))
            out.append(Case(method, "<message>", "truncated", self.template(method).SerializeToString()[:-3]))
        return out

    # -- sending --------------------------------------------------------------------
    def send(self, case: Case, *, credentials: bool) -> str:
        """The status code name of sending `case` (OK included). A server-streaming method
        (one request, many answers) is read to its end: its status comes after the last one."""
        md = ((auth.MD_AUTHORIZATION, auth.bearer(self.token)),) if credentials else ()
        try:
            if case.method in self.streaming:
                call = self.channel.unary_stream(case.method, request_serializer=lambda b: b,
                                                 response_deserializer=lambda b: b)
                for _ in call(case.payload, timeout=self.timeout_s, metadata=md):
                    pass
            else:
                call = self.channel.unary_unary(case.method, request_serializer=lambda b: b,
                                                response_deserializer=lambda b: b)
                call(case.payload, timeout=self.timeout_s, metadata=md)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    def alive(self) -> bool:
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def fuzz(self, seconds: float, seed: int = 0) -> tuple[int, list[str]]:
        """Random messages (2-4 attacks at once, or random bytes) for `seconds`, with and
        without credentials. -> (iterations, problems found)."""
        rng = random.Random(seed)
        methods = sorted(self.methods)
        problems, n = [], 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            method = rng.choice(methods)
            msg = self.template(method)
            fields = list(self.methods[method].fields)
            for fd in rng.sample(fields, min(len(fields), rng.randint(1, 4))) if fields else []:
                attacks = self._attacks_on(fd)
                if attacks:
                    self._apply(msg, fd, *rng.choice(attacks))
            payload = msg.SerializeToString()
            if rng.random() < 0.2 and payload:
                b = bytearray(payload)
                b[rng.randrange(len(b))] = rng.randrange(256)
                payload = bytes(b)
            case = Case(method, "<fuzz>", "random", payload)
            for creds in (True, False):
                code = self.send(case, credentials=creds)
                n += 1
                problems += judge(case, creds, code)
            if n % 50 == 0 and not self.alive():
                problems.append(f"server stopped answering after fuzz iteration {n}")
                break
        return n, problems


def judge(case: Case, credentials: bool, code: str) -> list[str]:
    """What is wrong with `code` as the answer to `case` (empty: nothing)."""
    out = []
    if code in BAD_CODES:
        out.append(f"{case.method} {case.field} {case.attack} creds={credentials}: {code}")
    if not credentials and auth.RPC_ROLES.get(case.method) != auth.PUBLIC and code != "UNAUTHENTICATED":
        out.append(f"{case.method} {case.field} {case.attack} without credentials: {code}, not UNAUTHENTICATED")
    return out


def _is_map(fd) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _repeated(fd) -> bool:
    return bool(fd.is_repeated)


def _scalar_default(fd):
    return "" if fd.type == fd.TYPE_STRING else (0.0 if fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT) else 0)


def _attack_tensor(t, attack: str, msg, fd) -> None:
    """Spoil one Tensor message in place."""
    if attack == "missing":
        msg.ClearField(fd.name)
        return
    if not t.dtype:
        _set(t, torch.ones(1, 4))
    if attack in ("nan_data", "inf_data", "huge_values") and t.dtype in ("float32", "float64", "bfloat16"):
        dtype = wire.DTYPES[t.dtype]
        fill = {"nan_data": math.nan, "inf_data": math.inf, "huge_values": 3e38}[attack]
        _set(t, torch.full(tuple(t.shape), fill, dtype=torch.float64).to(dtype))
    elif attack == "huge_values":
        _set(t, torch.full(tuple(t.shape), 2 ** 62, dtype=torch.int64))
    elif attack in ("nan_data", "inf_data"):
        t.data = t.data[: len(t.data) // 2]
    elif attack == "shape_data_mismatch":
        t.data = t.data + b"\x00" * 3
    elif attack == "negative_dim":
        del t.shape[:]
        t.shape.extend([-1, 4])
    elif attack == "huge_shape":
        del t.shape[:]
        t.shape.extend([1 << 40, 1 << 20])
    elif attack == "bad_dtype":
        t.dtype = "complex128"
    elif attack == "wrong_rank":
        t.shape.append(1)
    elif attack == "empty":
        del t.shape[:]
        t.shape.extend([0] * max(1, len(t.shape) or 1))
        t.data = b""
    elif attack == "wrong_dtype":
        t.dtype = "int32" if t.dtype != "int32" else "float32"
