"""Who may call what: roles, the role of every RPC, and the check made on every call.

Three credentials (bearer tokens in `authorization: Bearer <token>` metadata):

    read   Search, Fetch (without usage), Readout, Describe
    train  + gradients (ReadoutBackward, AccumulateValueGrads, AccumulateKeyGrads),
             usage (Fetch with hits/weight_sum) and the step barrier (EndStep)
    admin  + every StoreAdmin call (rows, flags, optimizer, usage, snapshots, hot swap)

A higher role implies the lower ones (admin > train > read), so one client holding the
admin token can do everything, as before. Health checks and server reflection are public
(load balancers and tools use them without credentials); an RPC missing from `RPC_ROLES`
is refused (deny by default), so a new RPC (e.g. a faster data path's handle-issuing
call) needs one line here before anyone can call it.

Tokens are compared in constant time. `Tokens.generate()` makes fresh random ones and
`write_token_file` / `read_token_file` keep them in a JSON file of mode 0600.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from typing import Callable

import grpc

from . import errors

READ, TRAIN, ADMIN, PUBLIC = "read", "train", "admin", "public"
RANK = {READ: 1, TRAIN: 2, ADMIN: 3}

_KS = "/knowledge_store.v1.KnowledgeStore/"
_AD = "/knowledge_store.v1.StoreAdmin/"
_TR = "/knowledge_store.v1.StoreTransport/"

# The role each RPC needs, one line per RPC (full gRPC method names).
RPC_ROLES: dict[str, str] = {
    _KS + "Describe": READ,
    _KS + "Search": READ,
    _KS + "Fetch": READ,                  # with usage (hits, weight_sum): TRAIN, checked by the servicer
    _KS + "FetchStream": READ,            # the same
    _KS + "OpenDataPath": READ,           # a faster data path's handles; each call on it needs its own role
    _KS + "Readout": READ,
    _KS + "ReadoutBackward": TRAIN,
    _KS + "AccumulateKeyGrads": TRAIN,
    _KS + "AccumulateValueGrads": TRAIN,
    _KS + "EndStep": TRAIN,
    _KS + "LeaseVersion": READ,           # pins a version for a read of several pieces (store_service/leases.py)
    _KS + "ReleaseLease": READ,
    # The bulk data path (store_service/transport): a call names a session (a capability Open
    # or OpenDataPath handed out) AND needs its role, like any other call.
    _TR + "Open": READ,
    _TR + "Close": READ,
    _TR + "Fetch": READ,                  # with usage: TRAIN, checked by the servicer
    _TR + "Readout": READ,
    _TR + "ReadoutBackward": TRAIN,
    _TR + "PushGrads": TRAIN,
    _AD + "Describe": ADMIN,
    _AD + "AddRows": ADMIN,
    _AD + "SetFrozen": ADMIN,
    _AD + "SetAblated": ADMIN,
    _AD + "SetOptimizer": ADMIN,
    _AD + "Usage": ADMIN,
    _AD + "WriteSnapshot": ADMIN,
    _AD + "PrepareVersion": ADMIN,
    _AD + "FlipVersion": ADMIN,
    _AD + "ReleaseVersion": ADMIN,
    _AD + "RelabelVersion": ADMIN,
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
}

MD_AUTHORIZATION = "authorization"


def bearer(token: str) -> str:
    return f"Bearer {token}"


@dataclass(frozen=True)
class Tokens:
    """The bearer token of each role ("" = no token grants that role by itself; the
    admin token, which must be set, still does)."""
    admin: str
    train: str = ""
    read: str = ""

    def __post_init__(self):
        if not self.admin:
            raise ValueError("Tokens need a non-empty admin token")
        given = [t for t in (self.admin, self.train, self.read) if t]
        if len(set(given)) != len(given):
            raise ValueError("each role needs its own token")

    @staticmethod
    def generate() -> "Tokens":
        return Tokens(*(secrets.token_urlsafe(32) for _ in range(3)))

    def role_of(self, token: bytes) -> str | None:
        """The role `token` grants (None: none). Every role is compared, in constant time."""
        found = None
        for role in (ADMIN, TRAIN, READ):
            mine = getattr(self, role)
            if mine and hmac.compare_digest(token, mine.encode()) and found is None:
                found = role
        return found


def write_token_file(path: str, tokens: Tokens) -> None:
    """Write `tokens` as JSON to a new file readable by its owner only (mode 0600)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(tokens), f)


def read_token_file(path: str) -> Tokens:
    """Tokens from a file written by `write_token_file`; refused when others may read it."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}; a token file must be readable by its owner only (0600)")
    with open(path) as f:
        return Tokens(**json.load(f))


def load_or_create_token_file(path: str) -> Tokens:
    """The tokens in `path`, made (fresh random ones, mode 0600) when it does not exist."""
    try:
        write_token_file(path, Tokens.generate())
    except FileExistsError:
        pass
    return read_token_file(path)


def presented_token(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == MD_AUTHORIZATION:
            value = value.encode() if isinstance(value, str) else value
            return value[len(b"Bearer "):] if value.startswith(b"Bearer ") else b""
    return None


class Authority:
    """The one check: may the caller of `method` (with this metadata) call it?"""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def check(self, method: str, metadata) -> None:
        need = RPC_ROLES.get(method)
        if need == PUBLIC:
            return
        if need is None:
            raise errors.PermissionDenied("this RPC has no role in store_service/auth.py; refused")
        self.require(need, metadata)

    def require(self, need: str, metadata) -> str:
        token = presented_token(metadata)
        if token is None:
            raise errors.Unauthenticated("needs `authorization: Bearer <token>` metadata")
        role = self.tokens.role_of(token)
        if role is None:
            raise errors.Unauthenticated("the bearer token in `authorization` metadata is not valid")
        if RANK[role] < RANK[need]:
            raise errors.PermissionDenied(f"the {role} role may not do this; it needs {need}")
        return role


class AuthInterceptor(grpc.ServerInterceptor):
    """Runs `Authority.check` before every RPC; a refused call never reaches a servicer.
    on_refused(method, code) is told of each refusal (metrics)."""

    def __init__(self, authority: Authority, status_of: Callable, on_refused: Callable[[str, str], None]):
        self._authority = authority
        self._status_of = status_of
        self._on_refused = on_refused

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        try:
            self._authority.check(details.method, details.invocation_metadata)
            return _tolerating_malformed(handler)
        except errors.StoreError as exc:
            code, message, trailing = self._status_of(exc)
            self._on_refused(details.method.rsplit("/", 1)[-1], code.name)

            def deny(request, context):
                context.set_trailing_metadata(trailing)
                context.abort(code, message)
            if handler.request_streaming and handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(deny)
            if handler.request_streaming:
                return grpc.stream_unary_rpc_method_handler(deny)
            if handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(deny)
            return grpc.unary_unary_rpc_method_handler(deny)


class _Malformed:
    """What a request that does not parse becomes (gRPC would answer INTERNAL)."""

    def __init__(self, error: Exception):
        self.error = f"{type(error).__name__}: {error}"[:120]


def _tolerating_malformed(handler):
    """A unary-request handler (unary or server-streaming answer) whose undecodable requests
    get INVALID_ARGUMENT instead of gRPC's INTERNAL."""
    if handler.request_deserializer is None or (handler.unary_unary is None and handler.unary_stream is None):
        return handler
    parse = handler.request_deserializer
    streaming = handler.unary_unary is None
    behavior = handler.unary_stream if streaming else handler.unary_unary

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's malformed message
            return _Malformed(exc)

    def refuse(request, context):
        context.set_trailing_metadata((("ks-error", "invalid-argument"), ("ks-field", "request")))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed message ({request.error})")

    def call(request, context):
        if isinstance(request, _Malformed):
            refuse(request, context)
        return behavior(request, context)

    def call_stream(request, context):
        if isinstance(request, _Malformed):
            refuse(request, context)
        yield from behavior(request, context)
    if streaming:
        return handler._replace(request_deserializer=deserialize, unary_stream=call_stream)
    return handler._replace(request_deserializer=deserialize, unary_unary=call)
