"""Domain errors of the store. The gRPC server maps each to one status code
(store_service/server.py) and the client maps codes back (store_service/client.py);
nothing else converts between them."""
from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class InvalidArgument(StoreError):
    """Bad shapes, dtypes, ids, NaN/Inf, empty batches, k > rows. Names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class NotFound(StoreError):
    """An unknown version or shard."""


class StaleVersion(StoreError):
    """The request expected a version this shard no longer (or not yet) holds."""

    def __init__(self, requested: int, serving: int, reason: str = ""):
        self.requested = requested
        self.serving = serving
        self.reason = reason   # why, where the numbers alone mislead (a lapsed lease on the serving version)
        super().__init__(f"version {requested} is not held by this shard; serving {serving}"
                         + (f" ({reason})" if reason else ""))


class FailedPrecondition(StoreError):
    """The operation does not fit the shard's state (e.g. add_rows on a shard that is not last)."""


class Unauthenticated(StoreError):
    """An admin call without a valid bearer token."""


class PermissionDenied(StoreError):
    """A valid credential whose role does not allow the call (store_service/auth.py)."""


class ResourceExhausted(StoreError):
    """A request over one of the server's bounds (store_service/limits.py). Names the limit."""

    def __init__(self, limit: str, message: str):
        self.limit = limit
        super().__init__(message)


class DataLoss(StoreError):
    """Stored data that cannot be read back (a corrupt zarr.json, a truncated chunk). Names the file."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class NonFinite(InvalidArgument):
    """A number that could make a stored value non-finite (over a documented bound, or a
    step whose result would not be finite). Counted in the server's metrics."""


class ShardsDisagree(FailedPrecondition):
    """A table's shards are at different versions or steps (one restarted): it may not train
    or publish until `Table.recover()` rolls them back to one published version."""


class StepRefused(FailedPrecondition):
    """end_step would have written a non-finite value; the step's gradients are dropped and
    nothing changes. Counted in the server's metrics."""


class ShardUnavailable(StoreError):
    """A shard could not be reached within the deadline, after retries."""

    def __init__(self, shard_id: int, address: str, cause: str):
        self.shard_id = shard_id
        self.address = address
        super().__init__(f"shard {shard_id} at {address} unavailable: {cause}")
