"""One shard of a published version served by its own process, and how to launch one.

    python -m store_service.serve --store-root ROOT --version 3 --shard 0 --port 50051 \
        --metrics-port 9100          # tokens from $KSTORE_ADMIN_TOKEN (and $KSTORE_TRAIN_TOKEN,
                                     # $KSTORE_READ_TOKEN) or --token-file; TLS with --tls-cert/--tls-key;
                                     # --limit max_k=1024 (store_service/limits.py)

    proc = start_shard_process(ROOT, 3, 0, admin_token="secret")   # waits until it serves
    proc.address; proc.stop()
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from store_service import auth, errors
from store_service.limits import Limits
from store_service.server import DEFAULT_FETCH_CHUNK_MB, DEFAULT_MAX_MESSAGE_MB, serve_shard
from store_service.tls import ServerTls
from store_service.shard import Shard

# One parseable line on stdout once the server is up: launchers read the bound ports from it.
_SERVING_LINE = re.compile(r"kstore-shard (\d+) serving (\S+) metrics (\S+)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve one shard of a published table version over gRPC.")
    parser.add_argument("--store-root", required=True)
    parser.add_argument("--version", type=int, required=True, help="published version to load")
    parser.add_argument("--shard", type=int, required=True, help="shard id within that version")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind ('::' or '0.0.0.0' for all)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: a free one)")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB)
    parser.add_argument("--fetch-chunk-mb", type=float, default=DEFAULT_FETCH_CHUNK_MB,
                        help="size of one piece of a streamed fetch reply")
    parser.add_argument("--data-paths", default="",
                        help="faster transports offered beside gRPC, comma-separated (store_service/datapath.py)")
    parser.add_argument("--workers", type=int, default=8, help="gRPC handler threads")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default=None,
                        help="where this shard's rows live, e.g. cpu or cuda:1 (default: the published table's "
                             "device); a swapped-in version stays there")
    parser.add_argument("--pin-memory", action="store_true",
                        help="with --device cpu: keep the rows page-locked (a GPU host serving from its RAM)")
    parser.add_argument("--admin-token-env", default="KSTORE_ADMIN_TOKEN",
                        help="environment variable holding the admin bearer token (the train and read tokens: "
                             "$KSTORE_TRAIN_TOKEN, $KSTORE_READ_TOKEN)")
    parser.add_argument("--token-file", default=None,
                        help="a JSON token file of mode 0600 (store_service.auth.write_token_file) instead of the "
                             "environment")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=None, help="PEM CA: mutual TLS, clients need a certificate it signed")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="override a bound of store_service/limits.py, e.g. --limit max_k=1024 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.token_file:
        tokens = auth.read_token_file(args.token_file)
    else:
        token = os.environ.get(args.admin_token_env, "")
        if not token:
            parser.error(f"set ${args.admin_token_env} to the admin bearer token (or give --token-file)")
        tokens = auth.Tokens(admin=token, train=os.environ.get("KSTORE_TRAIN_TOKEN", ""),
                             read=os.environ.get("KSTORE_READ_TOKEN", ""))
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key come together")
    tls = ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    try:
        limits = Limits().with_overrides(args.limit)
    except ValueError as e:
        parser.error(str(e))
    try:
        shard = Shard.load(args.store_root, args.version, args.shard, device=args.device,
                           pin_memory=True if args.pin_memory else None)
    except errors.StoreError as e:   # a clear line, not a traceback, for a bad version or device
        parser.exit(2, f"kstore-shard {args.shard}: cannot serve version {args.version} of {args.store_root}: {e}\n")
    handle = serve_shard(shard, args.port, tokens=tokens, host=args.host, metrics_port=args.metrics_port,
                         max_message_mb=args.max_message_mb, max_workers=args.workers, limits=limits, tls=tls,
                         data_paths=[k for k in args.data_paths.split(",") if k], fetch_chunk_mb=args.fetch_chunk_mb)
    # What is loaded by now (modules, the shard's state) lives as long as the process: out of
    # the collector's reach, a full collection no longer walks it in the middle of a call
    # (tens of ms with torch and grpc loaded; benchmarks/WIRE_NOTES.md).
    gc.freeze()
    print(f"kstore-shard {args.shard} serving {handle.address} metrics {handle.metrics_port}", flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    handle.stop(grace=2.0)


@dataclass
class ShardProcess:
    """A shard server running as its own process (`python -m store_service.serve`)."""
    proc: "subprocess.Popen[str]"
    shard_id: int
    address: str
    metrics_port: int | None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_shard_process(store_root: str, version: int, shard_id: int, *, admin_token: str = "",
                        tokens: auth.Tokens | None = None, port: int = 0,
                        host: str = "127.0.0.1", metrics_port: int | None = None, extra_args: Sequence[str] = (),
                        env: dict[str, str] | None = None, startup_timeout_s: float = 60.0) -> ShardProcess:
    """Launch one shard server process and wait until it reports its bound address.
    tokens (or admin_token alone) reach it through its environment."""
    tokens = tokens or auth.Tokens(admin=admin_token)
    cmd = [sys.executable, "-m", "store_service.serve", "--store-root", str(store_root), "--version", str(version),
           "--shard", str(shard_id), "--port", str(port), "--host", host, *extra_args]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    # Idle OpenMP threads sleep instead of spinning: several servers (and their
    # clients) often share a machine's cores, and spinning threads starve them.
    full_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(env or {}), "KSTORE_ADMIN_TOKEN": tokens.admin,
                "KSTORE_TRAIN_TOKEN": tokens.train, "KSTORE_READ_TOKEN": tokens.read}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=full_env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(f"shard server {shard_id} exited with {proc.returncode} before serving")
            continue
        m = _SERVING_LINE.match(line)
        if m:
            mport = None if m.group(3) == "None" else int(m.group(3))
            return ShardProcess(proc, shard_id, m.group(2), mport)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"shard server {shard_id} did not start within {startup_timeout_s}s")


if __name__ == "__main__":
    main()
