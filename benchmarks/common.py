"""What every benchmark script shares: naming the CPU it ran on, and writing
its result as JSON + PNG and printing the headline."""
from __future__ import annotations

import json
import os
import platform
from typing import Callable


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
