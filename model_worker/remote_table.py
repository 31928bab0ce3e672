"""A table served by shard server processes on this machine (loopback gRPC),
for tests and benchmarks that compare a remote table with an in-process one.

    with loopback_table(table_cfg, store_root) as table:   # table: store_service.table.Table over RemoteShards
        train(cfg, table=table)

The cluster layer (Ray actors) does this for real deployments; here we only
need the same wire path.
"""
from __future__ import annotations

import contextlib
import secrets
from typing import Iterator, Sequence

from store_service.config import TableConfig


@contextlib.contextmanager
def loopback_table(config: TableConfig, store_root: str, *, torch_threads: int = 1,
                   interceptors: Sequence = (), server_device: str | None = None,
                   servers: list | None = None, compact_readout: bool = True,
                   readout_wire_dtype: str = "float32", readout_chunk_rows: int = 0) -> Iterator:
    """Publish a fresh table of `config` (version 1 under store_root), serve each
    of its config.num_shards shards from its own process, and yield a client Table
    (`interceptors`: gRPC client interceptors on every shard's channel, e.g. a byte counter;
    `server_device`: where the servers keep their rows, default config.device;
    `servers`: a list to fill with each server's ShardProcess, whose /metrics port is then
    open, for callers that read the servers' own request timings;
    compact_readout, readout_wire_dtype, readout_chunk_rows: how readouts travel, see store_service.client.RemoteShard)."""
    from store_service.client import connect
    from store_service.server import start_shard_process
    from store_service.table import Table

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
                                                         *(["--device", server_device] if server_device else [])],
                                             metrics_port=0 if servers is not None else None))
        if servers is not None:
            servers.extend(procs)
        table = connect([p.address for p in procs], admin_token=token, store_root=store_root,
                        interceptors=interceptors, compact_readout=compact_readout,
                        readout_wire_dtype=readout_wire_dtype, readout_chunk_rows=readout_chunk_rows)
        yield table
    finally:
        if table is not None:
            table.close()
            for s in table.shards:
                s.close()
        for p in procs:
            p.stop()
