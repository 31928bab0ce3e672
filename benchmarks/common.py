"""What every benchmark script shares: naming the CPU it ran on, writing its
result as JSON + PNG and printing the headline, counting gRPC bytes."""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from typing import Callable, Sequence

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


def _size(message) -> int:
    """A message's serialized bytes (some requests travel already encoded, as bytes)."""
    return len(message) if isinstance(message, (bytes, bytearray)) else message.ByteSize()


class ByteCounter(grpc.UnaryUnaryClientInterceptor):
    """Serialized request + response bytes, calls and client-side wall seconds per method
    (the seconds cover protobuf serialization, transport and the server's handling, not
    the tensor <-> bytes conversion on either side of the call)."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.enabled = False
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        start = time.perf_counter()
        response = continuation(details, request)   # done (a blocking call) or in flight (.future)
        if self.enabled:
            method = details.method.rsplit("/", 1)[-1]

            def record(done) -> None:
                if done.exception() is not None:
                    return
                elapsed = time.perf_counter() - start
                size = _size(request) + _size(done.result())
                with self._lock:
                    self.bytes[method] = self.bytes.get(method, 0) + size
                    self.calls[method] = self.calls.get(method, 0) + 1
                    self.seconds[method] = self.seconds.get(method, 0.0) + elapsed
            response.add_done_callback(record)   # runs at once when the call is already done
        return response

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.seconds.clear()


def server_handling_seconds(metrics_port: int, host: str = "127.0.0.1") -> dict[str, tuple[float, float]]:
    """{method: (calls, seconds)} a shard server has spent handling RPCs so far (its
    `kstore_request_seconds` histogram, read from its /metrics endpoint)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "kstore_request_seconds":
            continue
        for sample in family.samples:
            method = sample.labels.get("method")
            if sample.name.endswith("_count"):
                out.setdefault(method, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(method, [0.0, 0.0])[1] = sample.value
    return {m: (c, s) for m, (c, s) in out.items()}


class CallTimer:
    """Wall seconds and calls of chosen methods of one object (a table), timed from the
    caller's side; `sync` (e.g. torch.cuda.synchronize) runs before and after each call, so
    GPU work queued before the call is not billed to it and work it queues is."""

    def __init__(self, obj, methods: Sequence[str], sync: Callable[[], None] | None = None):
        self.seconds = {m: 0.0 for m in methods}
        self.calls = {m: 0 for m in methods}
        self.enabled = False
        for m in methods:
            setattr(obj, m, self._wrap(m, getattr(obj, m), sync))

    def _wrap(self, name: str, fn: Callable, sync: Callable[[], None] | None) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            if sync:
                sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if sync:
                sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return result
        return timed
