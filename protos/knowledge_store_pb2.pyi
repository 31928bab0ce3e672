from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("kind", "row_start", "num_rows", "n_sub")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    N_SUB_FIELD_NUMBER: _ClassVar[int]
    kind: str
    row_start: int
    num_rows: int
    n_sub: int
    def __init__(self, kind: _Optional[str] = ..., row_start: _Optional[int] = ..., num_rows: _Optional[int] = ..., n_sub: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard_id", "row_start", "row_end", "version", "step", "address", "tag_rows", "partition_rows")
    class TagRowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PartitionRowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_END_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TAG_ROWS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ROWS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    row_start: int
    row_end: int
    version: int
    step: int
    address: str
    tag_rows: _containers.ScalarMap[str, int]
    partition_rows: _containers.ScalarMap[int, int]
    def __init__(self, shard_id: _Optional[int] = ..., row_start: _Optional[int] = ..., row_end: _Optional[int] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., address: _Optional[str] = ..., tag_rows: _Optional[_Mapping[str, int]] = ..., partition_rows: _Optional[_Mapping[int, int]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("info", "d_k", "d_v", "value_dtype", "segments")
    INFO_FIELD_NUMBER: _ClassVar[int]
    D_K_FIELD_NUMBER: _ClassVar[int]
    D_V_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    info: ShardInfo
    d_k: int
    d_v: int
    value_dtype: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, info: _Optional[_Union[ShardInfo, _Mapping]] = ..., d_k: _Optional[int] = ..., d_v: _Optional[int] = ..., value_dtype: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class TagFilter(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: Tensor
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SideQuery(_message.Message):
    __slots__ = ("partition", "k")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    partition: int
    k: int
    def __init__(self, partition: _Optional[int] = ..., k: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("version", "queries", "k", "tags", "where", "side", "want_keys")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    WANT_KEYS_FIELD_NUMBER: _ClassVar[int]
    version: int
    queries: Tensor
    k: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    where: TagFilter
    side: SideQuery
    want_keys: bool
    def __init__(self, version: _Optional[int] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ..., where: _Optional[_Union[TagFilter, _Mapping]] = ..., side: _Optional[_Union[SideQuery, _Mapping]] = ..., want_keys: _Optional[bool] = ...) -> None: ...

class SideResult(_message.Message):
    __slots__ = ("ids", "scores", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    scores: Tensor
    tags: _containers.MessageMap[str, Tensor]
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., tags: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("ids", "scores", "keys", "tags", "side")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    scores: Tensor
    keys: Tensor
    tags: _containers.MessageMap[str, Tensor]
    side: SideResult
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., tags: _Optional[_Mapping[str, Tensor]] = ..., side: _Optional[_Union[SideResult, _Mapping]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("version", "ids", "out_dtype", "hits", "weight_sum", "chunk_rows", "lease")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    OUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    version: int
    ids: Tensor
    out_dtype: str
    hits: Tensor
    weight_sum: Tensor
    chunk_rows: int
    lease: str
    def __init__(self, version: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., out_dtype: _Optional[str] = ..., hits: _Optional[_Union[Tensor, _Mapping]] = ..., weight_sum: _Optional[_Union[Tensor, _Mapping]] = ..., chunk_rows: _Optional[int] = ..., lease: _Optional[str] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("row_start", "values")
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    row_start: int
    values: Tensor
    def __init__(self, row_start: _Optional[int] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("host_id", "pid", "device")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    pid: int
    device: str
    def __init__(self, host_id: _Optional[str] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class TransportParams(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OpenDataPathRequest(_message.Message):
    __slots__ = ("kinds", "client", "offers")
    class OffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TransportParams
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TransportParams, _Mapping]] = ...) -> None: ...
    KINDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    client: Endpoint
    offers: _containers.MessageMap[str, TransportParams]
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., client: _Optional[_Union[Endpoint, _Mapping]] = ..., offers: _Optional[_Mapping[str, TransportParams]] = ...) -> None: ...

class OpenDataPathResponse(_message.Message):
    __slots__ = ("kind", "params", "server")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    params: TransportParams
    server: Endpoint
    def __init__(self, kind: _Optional[str] = ..., params: _Optional[_Union[TransportParams, _Mapping]] = ..., server: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...

class AccumulateValueGradsRequest(_message.Message):
    __slots__ = ("version", "request_id", "ids", "grads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    ids: Tensor
    grads: Tensor
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AccumulateValueGradsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SlotMask(_message.Message):
    __slots__ = ("rows", "cols", "bits")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    bits: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., bits: _Optional[bytes] = ...) -> None: ...

class ReadoutRequest(_message.Message):
    __slots__ = ("version", "ids", "weights", "slots", "out_dtype", "lease")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    OUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    version: int
    ids: Tensor
    weights: Tensor
    slots: SlotMask
    out_dtype: str
    lease: str
    def __init__(self, version: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., slots: _Optional[_Union[SlotMask, _Mapping]] = ..., out_dtype: _Optional[str] = ..., lease: _Optional[str] = ...) -> None: ...

class ReadoutResponse(_message.Message):
    __slots__ = ("out",)
    OUT_FIELD_NUMBER: _ClassVar[int]
    out: Tensor
    def __init__(self, out: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ReadoutBackwardRequest(_message.Message):
    __slots__ = ("version", "request_id", "ids", "weights", "grad_out", "slots")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    ids: Tensor
    weights: Tensor
    grad_out: Tensor
    slots: SlotMask
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., grad_out: _Optional[_Union[Tensor, _Mapping]] = ..., slots: _Optional[_Union[SlotMask, _Mapping]] = ...) -> None: ...

class ReadoutBackwardResponse(_message.Message):
    __slots__ = ("grad_weights",)
    GRAD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    grad_weights: Tensor
    def __init__(self, grad_weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AccumulateKeyGradsRequest(_message.Message):
    __slots__ = ("version", "request_id", "ids", "grads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    ids: Tensor
    grads: Tensor
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AccumulateKeyGradsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndStepRequest(_message.Message):
    __slots__ = ("request_id", "step", "worker", "num_workers", "timeout_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: int
    worker: int
    num_workers: int
    timeout_s: float
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[int] = ..., worker: _Optional[int] = ..., num_workers: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class EndStepResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("version", "ttl_s", "session")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    ttl_s: float
    session: str
    def __init__(self, version: _Optional[int] = ..., ttl_s: _Optional[float] = ..., session: _Optional[str] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("lease", "version")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    lease: str
    version: int
    def __init__(self, lease: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: str
    def __init__(self, lease: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AddRowsRequest(_message.Message):
    __slots__ = ("request_id", "values", "keys", "bias", "tags", "partition")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    values: Tensor
    keys: Tensor
    bias: Tensor
    tags: _containers.MessageMap[str, Tensor]
    partition: Tensor
    def __init__(self, request_id: _Optional[str] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., tags: _Optional[_Mapping[str, Tensor]] = ..., partition: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AddRowsResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SetFlagRequest(_message.Message):
    __slots__ = ("request_id", "ids", "value")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ids: Tensor
    value: bool
    def __init__(self, request_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., value: _Optional[bool] = ...) -> None: ...

class SetFlagResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OptimizerSettings(_message.Message):
    __slots__ = ("kind", "lr", "key_lr", "beta1", "beta2", "eps")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    KEY_LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    key_lr: float
    beta1: float
    beta2: float
    eps: float
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., key_lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class SetOptimizerRequest(_message.Message):
    __slots__ = ("request_id", "optimizer", "bias_step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BIAS_STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    optimizer: OptimizerSettings
    bias_step: float
    def __init__(self, request_id: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerSettings, _Mapping]] = ..., bias_step: _Optional[float] = ...) -> None: ...

class SetOptimizerResponse(_message.Message):
    __slots__ = ("optimizer", "bias_step")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BIAS_STEP_FIELD_NUMBER: _ClassVar[int]
    optimizer: OptimizerSettings
    bias_step: float
    def __init__(self, optimizer: _Optional[_Union[OptimizerSettings, _Mapping]] = ..., bias_step: _Optional[float] = ...) -> None: ...

class UsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UsageResponse(_message.Message):
    __slots__ = ("hits", "weight_sum", "frozen", "ablated")
    HITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    ABLATED_FIELD_NUMBER: _ClassVar[int]
    hits: Tensor
    weight_sum: Tensor
    frozen: Tensor
    ablated: Tensor
    def __init__(self, hits: _Optional[_Union[Tensor, _Mapping]] = ..., weight_sum: _Optional[_Union[Tensor, _Mapping]] = ..., frozen: _Optional[_Union[Tensor, _Mapping]] = ..., ablated: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class WriteSnapshotRequest(_message.Message):
    __slots__ = ("request_id", "version_dir", "version", "full")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_DIR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    version_dir: str
    version: int
    full: bool
    def __init__(self, request_id: _Optional[str] = ..., version_dir: _Optional[str] = ..., version: _Optional[int] = ..., full: _Optional[bool] = ...) -> None: ...

class PrepareVersionRequest(_message.Message):
    __slots__ = ("request_id", "store_root", "version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_ROOT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    store_root: str
    version: int
    def __init__(self, request_id: _Optional[str] = ..., store_root: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class FlipVersionRequest(_message.Message):
    __slots__ = ("request_id", "version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    version: int
    def __init__(self, request_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ReleaseVersionRequest(_message.Message):
    __slots__ = ("request_id", "version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    version: int
    def __init__(self, request_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelabelVersionRequest(_message.Message):
    __slots__ = ("request_id", "version", "new_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    version: int
    new_version: int
    def __init__(self, request_id: _Optional[str] = ..., version: _Optional[int] = ..., new_version: _Optional[int] = ...) -> None: ...

class RelabelVersionResponse(_message.Message):
    __slots__ = ("relabelled",)
    RELABELLED_FIELD_NUMBER: _ClassVar[int]
    relabelled: int
    def __init__(self, relabelled: _Optional[int] = ...) -> None: ...

class OpenTransportRequest(_message.Message):
    __slots__ = ("kind", "host_id", "buffer_bytes", "backend")
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    host_id: str
    buffer_bytes: int
    backend: str
    def __init__(self, kind: _Optional[str] = ..., host_id: _Optional[str] = ..., buffer_bytes: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class OpenTransportResponse(_message.Message):
    __slots__ = ("session", "ticket", "socket", "buffer_bytes", "rendezvous_host", "rendezvous_port", "max_bytes", "host_id", "backend")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_HOST_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    session: str
    ticket: str
    socket: str
    buffer_bytes: int
    rendezvous_host: str
    rendezvous_port: int
    max_bytes: int
    host_id: str
    backend: str
    def __init__(self, session: _Optional[str] = ..., ticket: _Optional[str] = ..., socket: _Optional[str] = ..., buffer_bytes: _Optional[int] = ..., rendezvous_host: _Optional[str] = ..., rendezvous_port: _Optional[int] = ..., max_bytes: _Optional[int] = ..., host_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class CloseTransportRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class CloseTransportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Placement(_message.Message):
    __slots__ = ("session", "offset", "capacity", "tag")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    session: str
    offset: int
    capacity: int
    tag: int
    def __init__(self, session: _Optional[str] = ..., offset: _Optional[int] = ..., capacity: _Optional[int] = ..., tag: _Optional[int] = ...) -> None: ...

class PlacedTensor(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PlacedFetchRequest(_message.Message):
    __slots__ = ("at", "fetch")
    AT_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    at: Placement
    fetch: FetchRequest
    def __init__(self, at: _Optional[_Union[Placement, _Mapping]] = ..., fetch: _Optional[_Union[FetchRequest, _Mapping]] = ...) -> None: ...

class PlacedFetchResponse(_message.Message):
    __slots__ = ("values", "version", "step")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    values: PlacedTensor
    version: int
    step: int
    def __init__(self, values: _Optional[_Union[PlacedTensor, _Mapping]] = ..., version: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PlacedReadoutRequest(_message.Message):
    __slots__ = ("at", "readout")
    AT_FIELD_NUMBER: _ClassVar[int]
    READOUT_FIELD_NUMBER: _ClassVar[int]
    at: Placement
    readout: ReadoutRequest
    def __init__(self, at: _Optional[_Union[Placement, _Mapping]] = ..., readout: _Optional[_Union[ReadoutRequest, _Mapping]] = ...) -> None: ...

class PlacedReadoutResponse(_message.Message):
    __slots__ = ("out", "version")
    OUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    out: PlacedTensor
    version: int
    def __init__(self, out: _Optional[_Union[PlacedTensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class PlacedReadoutBackwardRequest(_message.Message):
    __slots__ = ("at", "backward")
    AT_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    at: Placement
    backward: ReadoutBackwardRequest
    def __init__(self, at: _Optional[_Union[Placement, _Mapping]] = ..., backward: _Optional[_Union[ReadoutBackwardRequest, _Mapping]] = ...) -> None: ...

class PlacedGradsRequest(_message.Message):
    __slots__ = ("at", "kind", "version", "request_id", "ids", "grads")
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    at: Placement
    kind: str
    version: int
    request_id: str
    ids: Tensor
    grads: PlacedTensor
    def __init__(self, at: _Optional[_Union[Placement, _Mapping]] = ..., kind: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[PlacedTensor, _Mapping]] = ...) -> None: ...

class PlacedGradsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
