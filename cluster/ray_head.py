"""The Ray head a standing cluster (`kstore up`) runs on, started and stopped by
process id.

`ray start --head --block` runs in a session of its own, on free ports, with a Ray
temp directory of its own, and keeps its children (GCS, raylet, workers) in that
process group; `kstore down` (or a failed `kstore up`) ends that group and nothing
else. `ray stop` would end every Ray process of the user on the machine, other
clusters' too; and a head in the shared temp directory (/tmp/ray) would be where
every `ray.init()` on the machine connects (its ray_current_cluster file), even
after the head is gone.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .cli_args import CliError


@dataclass
class RayHead:
    pid: int            # the `ray start --block` process, leader of its process group
    address: str        # host:port of its GCS, what ray.init(address=...) takes
    temp_dir: str = ""  # its Ray temp directory (sessions, sockets, logs), removed by stop()

    def to_dict(self) -> dict:
        return {"pid": self.pid, "address": self.address, "temp_dir": self.temp_dir}

    @staticmethod
    def from_dict(d: dict) -> "RayHead":
        return RayHead(int(d["pid"]), str(d["address"]), str(d.get("temp_dir", "")))

    def alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """End the head's process group (SIGTERM, then SIGKILL whatever is left) and
        remove its temp directory."""
        try:
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
        finally:
            if self.temp_dir and not self.alive():
                shutil.rmtree(self.temp_dir, ignore_errors=True)


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
    # short, under /tmp: Ray's Unix socket paths live in it
    temp_dir = tempfile.mkdtemp(prefix="kstore-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray if os.path.exists(ray) else "ray", "start", "--head", "--block", "--disable-usage-stats",
           f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
           # every port its own: two clusters on one machine must not collide
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc.pid, f"127.0.0.1:{port}", temp_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
            tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise CliError(f"`ray start --head` exited with code {proc.returncode}: {tail[0]} "
                           f"(full log: {log_path})")
        if "Ray runtime started" in log_path.read_text():
            return head
        time.sleep(0.5)
    head.stop()
    raise CliError(f"the Ray head did not start within {timeout_s:.0f}s (log: {log_path})")
