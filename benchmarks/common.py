"""What every benchmark script shares: naming the CPU it ran on, writing its
result as JSON + PNG and printing the headline, counting gRPC bytes."""
from __future__ import annotations

import json
import os
import platform
from typing import Callable

import grpc


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_results(result: dict, out: str, plot: Callable[[dict, str], object]) -> None:
    """Write `result` to `out` (JSON), draw `plot(result, <out>.png)`, print the headline."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, out.replace(".json", ".png"))
    print(json.dumps(result["headline"], indent=2))


class ByteCounter(grpc.UnaryUnaryClientInterceptor):
    """Serialized request + response bytes per method."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.enabled = False

    def intercept_unary_unary(self, continuation, details, request):
        response = continuation(details, request)
        if self.enabled:
            method = details.method.rsplit("/", 1)[-1]
            size = request.ByteSize() + response.result().ByteSize()
            self.bytes[method] = self.bytes.get(method, 0) + size
            self.calls[method] = self.calls.get(method, 0) + 1
        return response

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
