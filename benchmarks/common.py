"""What every benchmark script shares: naming the CPU it ran on, the provenance every
result carries (`provenance`, `check_reuse`), writing its result as JSON + PNG and
printing the headline (`write_result`), counting gRPC bytes."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable, Sequence

import grpc


from model_worker.provenance import (PROVENANCE_FIELDS, REPO, SOURCE_COMMIT_ENV, command_line,  # noqa: F401
                                     cpu_model, git_commit, git_dirty, machine, provenance)


class ReuseRefused(SystemExit):
    pass


def check_reuse(earlier: dict, force: bool = False, what: str = "runs") -> dict:
    """Before taking runs from an earlier results JSON: the commit they came from, refused
    (SystemExit) when it is not the current commit (or unknown), unless `force`; the
    returned record goes in the new result (e.g. result["reused"]) so that the reuse, the
    earlier tree's dirty flag and whether it was forced are marked."""
    prov = earlier.get("provenance") or {}
    came_from = prov.get("commit", "unknown")
    now = git_commit()
    same = came_from == now
    if not same and not force:
        raise ReuseRefused(f"refusing to reuse {what} from commit {came_from} (dirty={prov.get('dirty')}); "
                           f"this is {now}: re-run them, or pass --force-reuse to take them anyway (marked)")
    return {"what": what, "from_commit": came_from, "from_dirty": prov.get("dirty"),
            "from_date": prov.get("date"), "same_commit": came_from == now, "forced": not same}


def write_result(path: str, payload: dict, argv: Sequence[str] | None = None, device: str = "cpu",
                 plot: Callable[[dict, str], object] | None = None) -> dict:
    """Write `payload` + its provenance to `path` (JSON; `payload` must have a "headline"),
    draw `plot(result, <path>.png)` if given, print the headline; returns what was written.
    A provenance the payload already carries (e.g. taken at the start of a long run) is kept."""
    if "headline" not in payload:
        raise ValueError("a benchmark result needs a 'headline'")
    result = {**payload, "provenance": payload.get("provenance") or provenance(argv, device)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    if plot is not None:
        plot(result, path.replace(".json", ".png"))
    print(json.dumps(result["headline"], indent=2))
    return result


def write_results(result: dict, out: str, plot: Callable[[dict, str], object], device: str = "cpu") -> None:
    """Older name: write_result(out, result, plot=plot)."""
    write_result(out, result, device=device, plot=plot)


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
