"""Domain error -> gRPC status code, message and trailing metadata: the one mapping on
the server side (the client maps codes back in `store_service.client.error_from_rpc`).
Messages are cut short, so an error never echoes a huge input back."""
from __future__ import annotations

import grpc

from . import errors
from .wire import MD_ERROR, MD_FIELD, MD_REQUESTED_VERSION, MD_SERVING_VERSION, MD_STALE_REASON

MD_LIMIT = "ks-limit"
MAX_MESSAGE_CHARS = 400


def short(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 20] + f"... ({len(text)} chars)"


def status_of(exc: BaseException, limit: int = MAX_MESSAGE_CHARS
              ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    code, md = _code_of(exc)
    message = str(exc) if code != grpc.StatusCode.INTERNAL else f"{type(exc).__name__}: {exc}"
    return code, short(message, limit), tuple((k, short(v, 100)) for k, v in md)


def _code_of(exc: BaseException) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    if isinstance(exc, errors.InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, ((MD_ERROR, "invalid-argument"), (MD_FIELD, exc.field))
    if isinstance(exc, errors.StaleVersion):
        return grpc.StatusCode.FAILED_PRECONDITION, ((MD_ERROR, "stale-version"),
                                                     (MD_REQUESTED_VERSION, str(exc.requested)),
                                                     (MD_SERVING_VERSION, str(exc.serving)),
                                                     (MD_STALE_REASON, exc.reason))
    if isinstance(exc, errors.NotFound):
        return grpc.StatusCode.NOT_FOUND, ((MD_ERROR, "not-found"),)
    if isinstance(exc, errors.FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION, ((MD_ERROR, "failed-precondition"),)
    if isinstance(exc, errors.Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, ((MD_ERROR, "unauthenticated"),)
    if isinstance(exc, errors.PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, ((MD_ERROR, "permission-denied"),)
    if isinstance(exc, errors.ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, ((MD_ERROR, "resource-exhausted"), (MD_LIMIT, exc.limit))
    if isinstance(exc, errors.DataLoss):
        return grpc.StatusCode.DATA_LOSS, ((MD_ERROR, "data-loss"),)
    if isinstance(exc, errors.ShardUnavailable):
        return grpc.StatusCode.UNAVAILABLE, ((MD_ERROR, "unavailable"),)
    return grpc.StatusCode.INTERNAL, ((MD_ERROR, "internal"),)
