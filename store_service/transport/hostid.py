"""Which host a process runs on, so that same-host transports are offered only there.

The kernel's boot id (a random UUID per boot, shared by every process and container of one
kernel) with the host name: two processes with the same id share memory and GPUs. A client
can give another id (`ClientConfig.host_id`) to force the cross-host path."""
from __future__ import annotations

import functools
import socket


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:   # not Linux: the host name alone
        boot = ""
    return f"{socket.gethostname()}/{boot}"
