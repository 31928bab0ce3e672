"""Remote tables on this machine, for tests and benchmarks that compare a table over gRPC
with an in-process one (the cluster layer does this with Ray actors for real).

    with loopback_table(table_cfg, store_root) as table:   # shard servers as processes
        train(cfg, table=table)

    with served_table(store_root, version) as table:       # shard servers as threads here
        table.search(queries, k)

Both yield a `store_service.table.Table` over `RemoteShard`s that talk to real gRPC
servers on 127.0.0.1, and stop the servers and close every connection on exit.
"""
from __future__ import annotations

import contextlib
import secrets
from typing import Iterator, Sequence

from store_service import persistence
from store_service.client import connect
from store_service.config import TableConfig
from store_service.serve import start_shard_process
from store_service.server import serve_shard
from store_service.shard import Shard
from store_service.table import Table


@contextlib.contextmanager
def loopback_table(config: TableConfig, store_root: str, *, torch_threads: int = 1,
                   interceptors: Sequence = (), server_device: str | None = None,
                   servers: list | None = None, compact_readout: bool = True,
                   readout_wire_dtype: str = "float32", readout_chunk_rows: int = 0,
                   data_paths: Sequence[str] = (), connect_kw: dict | None = None) -> Iterator[Table]:
    """Publish a fresh table of `config` (version 1 under store_root), serve each
    of its config.num_shards shards from its own process, and yield a client Table.

    interceptors: gRPC client interceptors on every shard's channel (e.g. a byte counter).
    server_device: where the servers keep their rows (default config.device).
    servers: a list to fill with each server's `serve.ShardProcess`, whose /metrics port
    is then open, for callers that read the servers' own request timings.
    compact_readout, readout_wire_dtype, readout_chunk_rows: how readouts travel, see
    `store_service.client.RemoteShard`. data_paths: transports the servers offer and the
    client asks for. connect_kw: more arguments of `connect` (wire_config, device...)."""
    local = Table.create(config, store_root)
    version = local.snapshot()
    local.close()
    token = secrets.token_hex(8)
    procs = []
    table = None
    try:
        for shard_id in range(config.num_shards):
            procs.append(start_shard_process(store_root, version, shard_id, admin_token=token,
                                             extra_args=["--torch-threads", str(torch_threads),
                                                         *(["--device", server_device] if server_device else []),
                                                         *(["--data-paths", ",".join(data_paths)] if data_paths
                                                           else [])],
                                             metrics_port=0 if servers is not None else None))
        if servers is not None:
            servers.extend(procs)
        table = connect([p.address for p in procs], admin_token=token, store_root=store_root,
                        interceptors=interceptors, compact_readout=compact_readout,
                        readout_wire_dtype=readout_wire_dtype, readout_chunk_rows=readout_chunk_rows,
                        data_paths=data_paths, **(connect_kw or {}))
        yield table
    finally:
        if table is not None:
            _close(table)
        for p in procs:
            p.stop()


@contextlib.contextmanager
def served_table(store_root: str, version: int, *, num_shards: int | None = None, admin_token: str = "",
                 **connect_kw) -> Iterator[Table]:
    """Serve the shards of published `version` from gRPC servers in this process (one
    thread pool each) and yield a client Table over them.

    num_shards: serve shards 0..num_shards-1 (default: every shard of the version).
    admin_token: the servers' StoreAdmin token (default: a random one).
    connect_kw: passed to `store_service.client.connect` (store_root defaults to store_root)."""
    if num_shards is None:
        num_shards = len(persistence.read_root_attrs(store_root, version)["shards"])
    token = admin_token or secrets.token_hex(8)
    servers = [serve_shard(Shard.load(store_root, version, i), admin_token=token) for i in range(num_shards)]
    table = None
    try:
        table = connect([s.address for s in servers], admin_token=token, **{"store_root": store_root, **connect_kw})
        yield table
    finally:
        if table is not None:
            _close(table)
        for s in servers:
            s.stop(grace=None)


def _close(table: Table) -> None:
    table.close()
    for shard in table.shards:
        shard.close()
