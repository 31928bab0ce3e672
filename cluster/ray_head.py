"""The Ray head a standing cluster (`kstore up`) runs on, started and stopped by
process id.

`ray start --head --block` runs in a session of its own, on a free port, and keeps
its children (GCS, raylet, workers) in that process group; `kstore down` (or a
failed `kstore up`) ends that group and nothing else. `ray stop` would end every
Ray process of the user on the machine, other clusters' too.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cli_args import CliError


@dataclass
class RayHead:
    pid: int            # the `ray start --block` process, leader of its process group
    address: str        # host:port of its GCS, what ray.init(address=...) takes

    def to_dict(self) -> dict:
        return {"pid": self.pid, "address": self.address}

    @staticmethod
    def from_dict(d: dict) -> "RayHead":
        return RayHead(int(d["pid"]), str(d["address"]))

    def alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """End the head's process group: SIGTERM, then SIGKILL whatever is left."""
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                _reap(self.pid)
                if not self.alive():
                    return
                time.sleep(0.2)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(num_cpus: int, log_path: Path, timeout_s: float = 90.0) -> RayHead:
    """Start a Ray head on this machine; return once it accepts connections."""
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray if os.path.exists(ray) else "ray", "start", "--head", "--block", "--disable-usage-stats",
           f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
           # every port its own: two clusters on one machine must not collide
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc.pid, f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise CliError(f"`ray start --head` exited with code {proc.returncode}: {tail[0]} "
                           f"(full log: {log_path})")
        if "Ray runtime started" in log_path.read_text():
            return head
        time.sleep(0.5)
    head.stop()
    raise CliError(f"the Ray head did not start within {timeout_s:.0f}s (log: {log_path})")
