"""Which code a profiled step's aten ops come from (benchmarks/launch_count.py --sources).

A profile taken with `with_stack=True` holds the Python functions as events around the ops
they call. An op of the forward is charged to the innermost function of ours around it (and
the call it made there: `model_worker/moe.py(123): forward_padded -> bmm`); an op of the
backward to the forward op that made its autograd node (matched by sequence number), marked
`backward of`; the optimizer's step to `optimizer`; the rest of the backward (autograd's
gradient accumulation, mostly) to `other (backward)`, and anything else to `other (forward)`.
Functions are named by the line they start on, as the profiler names them.
"""
from __future__ import annotations

import re
from collections import Counter

OURS = ("model_worker/", "store_service/", "benchmarks/")
_OBJECT = re.compile(r" of .* object at 0x[0-9a-f]+")


def _is_ours(name: str) -> bool:
    return ".py(" in name and any(root in name for root in OURS)


def _short(name: str) -> str:
    """A profiler's Python event name, without the object address and the path up to the package."""
    if name.startswith("<built-in "):
        name = _OBJECT.sub("", name).split(" ", 2)[2].rstrip(">")       # `<built-in method bmm of ...>` -> `bmm`
    for root in OURS + ("torch/",):
        if root in name:
            return (root if root != "torch/" else "") + name.split(root, 1)[1]
    return name


def _caller(event) -> str | None:
    """The innermost function of ours around `event`, with the call it made (None: none)."""
    call = None
    while event is not None:
        if _is_ours(event.name):
            return _short(event.name) + (f" -> {call}" if call else "")
        if call is None and not event.name.startswith("aten::"):
            call = _short(event.name)         # the innermost call: `bmm`, `linear`, not module.__call__
        event = event.cpu_parent
    return None


def _is_node(name: str) -> bool:
    """An autograd node's event (`MulBackward0`, a Function's `...Backward`), not the engine's wrapper."""
    return "Backward" in name and not name.startswith("autograd::")


def op_sources(events) -> Counter:
    """events: a profile's `prof.events()` (taken with with_stack=True) -> Counter of aten
    ops by the code they come from."""
    made_by = {}          # sequence number -> the forward code that made that autograd node
    for e in events:      # (an aten op's, or an autograd.Function's forward)
        if e.sequence_nr >= 0 and not _is_node(e.name) and not e.name.startswith("autograd::"):
            made_by.setdefault(e.sequence_nr, _caller(e))
    sources: Counter = Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        source, backward, x = None, False, e
        while x is not None and source is None:
            if x.name.startswith("Optimizer."):
                source = "optimizer"
            elif _is_node(x.name):
                source = f"backward of {made_by.get(x.sequence_nr) or '?'} [{x.name}]"
            backward = backward or x.name.startswith("autograd::engine")
            x = x.cpu_parent
        if source is None:        # the engine's own work in backward (gradient accumulation) is no line's
            source = "other (backward)" if backward else _caller(e) or "other (forward)"
        sources[source] += 1
    return sources
