"""The measurements of benchmarks/scale_bench.py, one function per phase. Each takes the
parsed arguments (and the table where it needs one) and returns a JSON-able record.

Timings are wall seconds around calls that end with the device synchronised; repeated
ones are reported as median, min and max. Memory: GPU bytes allocated by torch (now and
peak since the phase began) and the process's host RSS (now and peak; the peak is reset
per phase through /proc/self/clear_refs where Linux allows it).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
import shutil
import statistics
import subprocess
import threading
import time

import torch

from store_service import persistence, versions
from store_service.config import OptimizerConfig, TableConfig
from store_service.shard import Shard
from store_service.state import state_tensors
from store_service.table import Table

SEARCH_BATCH, SEARCH_K, FETCH_ROWS = 4096, 32, 115_000


# -- helpers -----------------------------------------------------------------------------

def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM (the peak RSS)
    except OSError:
        pass


def memory(device: str) -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            kv = dict(line.split(":", 1) for line in f if ":" in line)
        out["host_rss_gb"] = int(kv["VmRSS"].split()[0]) / 2**20
        out["host_peak_gb"] = int(kv["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        pass
    if device.startswith("cuda"):
        out["gpu_now_gb"] = torch.cuda.memory_allocated() / 2**30
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def drop_caches() -> bool:
    """Empty the page cache (root only); False where it could not, so a read is warm."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def parse_rows(text: str) -> tuple[str, int]:
    """"1M" -> ("1M", 1024): a label and the product segment's n (rows n^2 ~ the label)."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not m:
        raise SystemExit(f"--rows: cannot read {text!r} (e.g. 64k, 1M, 16M)")
    rows = int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[m.group(2).lower()]
    return text.strip(), math.isqrt(rows)


def optimizer_kind_ok(kind: str) -> str | None:
    """None if this checkout knows optimizer `kind`, else why not."""
    try:
        OptimizerConfig(kind)
        return None
    except Exception as e:  # noqa: BLE001 -- any refusal is reported, not raised
        return f"optimizer {kind!r} is not available in this checkout ({e})"


def host_rows_supported() -> bool:
    return "pin_memory" in TableConfig.__dataclass_fields__


def make_config(args, n: int, device: str, host: bool = False) -> TableConfig:
    kw = dict(d_k=args.d_k, d_v=args.d_v, segments=[("product", n)], value_dtype="bfloat16", store_codebooks=True,
              num_shards=1, device=device, bias_step=0.0, seed=0)
    if args.optimizer_used:
        kw["optimizer"] = OptimizerConfig(args.optimizer_used, lr=0.01)
    if host:
        kw["pin_memory"] = True
    return TableConfig(**kw)


def optimizer_bytes(table: Table) -> dict:
    """Optimizer state bytes (every opt_* / key_* array, step counts included) over value
    bytes, from the serving state (Shard.memory where the checkout has it)."""
    sh = table.shards[0]
    if hasattr(sh, "memory"):
        m = sh.memory()
        return {"kind": m["optimizer"], "optimizer_bytes": m["optimizer_bytes"], "value_bytes": m["value_bytes"],
                "ratio": m["optimizer_over_values"], "source": "Shard.memory"}
    with sh._use(0) as st, st.lock:
        ts = state_tensors(st)
        kind = st.config.optimizer.kind
    nb = {n: t.numel() * t.element_size() for n, t in ts.items()}
    opt = sum(b for n, b in nb.items() if n.startswith(("opt_", "key_")))
    return {"kind": kind, "optimizer_bytes": opt, "value_bytes": nb["values"], "ratio": opt / nb["values"],
            "source": "persisted arrays"}


def touch_rows(table: Table, frac: float, seed: int, device: str) -> torch.Tensor:
    """One step whose gradients reach `frac` of the rows, drawn at random -> their ids."""
    n = table.info().num_rows
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, int(n * frac))].sort().values
    ids = ids.to(device)
    gen = torch.Generator(device).manual_seed(seed)   # drawn where they are used: no host trip
    grads = torch.randn(ids.numel(), table.info().d_v, generator=gen, device=device) * 1e-2
    table.accumulate_value_grads(ids, grads, request_id=f"touch-{seed}")
    table.end_step(table.info().step)
    return ids


# -- phases ------------------------------------------------------------------------------

def disk(args) -> dict:
    """The disk's own sequential speed, with dd, where the versions are written."""
    os.makedirs(args.store_root, exist_ok=True)
    path = os.path.join(args.store_root, "dd.bin")
    count = max(1, int(args.dd_gb * 1024 / 16))
    out = {"file_gb": count * 16 / 1024, "bs": "16M"}
    try:
        w = _dd(["if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "oflag=direct", "conv=fsync"])
        out["direct"] = True
    except RuntimeError as e:   # O_DIRECT refused (tmpfs, some overlays): buffered + fsync
        out.update(direct=False, direct_error=str(e)[-200:])
        w = _dd(["if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"])
    out["cold"] = drop_caches()
    r = _dd([f"if={path}", "of=/dev/null", "bs=16M"] + (["iflag=direct"] if out["direct"] else []))
    os.remove(path)
    out.update(write_gbps=w, read_gbps=r)
    return out


def _dd(argv: list[str]) -> float:
    p = subprocess.run(["dd", *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip())
    m = re.search(r"(\d+) bytes.*copied, ([\d.]+) s", p.stderr)
    if not m:
        raise RuntimeError(f"cannot read dd's output: {p.stderr!r}")
    return int(m.group(1)) / float(m.group(2)) / 1e9


def table_root(args, n: int, host: bool = False) -> str:
    return os.path.join(args.store_root, f"n{n}{'_host' if host else ''}")


def create(args, n: int, device: str, host: bool = False) -> tuple[Table, dict]:
    reset_memory(device)
    root = table_root(args, n, host)
    shutil.rmtree(root, ignore_errors=True)
    cfg = make_config(args, n, "cpu" if host else device, host)
    s, table = timed(lambda: Table.create(cfg, root), device)
    rec = {"rows": n * n, "n_sub": n, "create_s": s, "optimizer": table.shards[0]._serving.config.optimizer.kind,
           **memory(device)}
    rec["gpu_bytes_per_row"] = rec.get("gpu_now_gb", 0) * 2**30 / (n * n)
    return table, rec


def optimizer(args, table: Table, device: str) -> dict:
    """The table's own optimizer state over its values (the headline), and per kind: the
    same ratio on a fresh 4,096-row table of that kind (the state is per row) (a live switch keeps the state of
    the kinds used before, so the big table would count theirs too), and the time of a
    step of 115k rows (a quarter of a small table) on the big table switched to it."""
    out = {"default": optimizer_bytes(table), "kinds": {}}
    n = table.info().num_rows
    touched = min(FETCH_ROWS, n // 4)
    for kind in args.optimizers:
        why = optimizer_kind_ok(kind)
        if why:
            out["kinds"][kind] = {"skipped": why}
            continue
        small = Table.create(dataclasses.replace(make_config(args, 64, device),
                                                 optimizer=OptimizerConfig(kind, lr=0.01)))
        rec = {"fresh_table_rows": 64 * 64, **optimizer_bytes(small)}
        small.close()
        del small
        old = table.set_optimizer(OptimizerConfig(kind, lr=0.01))
        reset_memory(device)
        times = [timed(lambda i=i: touch_rows(table, touched / n, 100 + i, device), device)[0]
                 for i in range(args.repeats)]
        out["kinds"][kind] = {**rec, "step_rows": touched, "step_s": stats(times), **memory(device)}
        table.set_optimizer(old.optimizer)
    return out


def search(args, table: Table, device: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(args.search_batch, args.d_k, generator=gen), dim=-1).to(
        table.shards[0].device)
    table.search(q, SEARCH_K)
    times = [timed(lambda: table.search(q, SEARCH_K), device)[0] for _ in range(args.repeats * 3)]
    return {"batch": args.search_batch, "k": SEARCH_K, "seconds": stats(times),
            "qps": args.search_batch / statistics.median(times)}


def fetch(args, table: Table, device: str) -> dict:
    n = table.info().num_rows
    m = min(FETCH_ROWS, n)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:m].to(device)
    table.fetch(ids)
    times = [timed(lambda: table.fetch(ids), device)[0] for _ in range(args.repeats * 3)]
    return {"rows": m, "ids_on": str(ids.device), "seconds": stats(times), "rows_per_s": m / statistics.median(times)}


def persist(args, ctx: dict, device: str) -> dict:
    """Full snapshots (fsync included) and cold loads against the disk; then, at sizes up to
    --incremental-max, incremental snapshots with 1% of random rows changed, and a chain of
    them compacted and checked bitwise. Above --keep-one-above rows the serving table
    (ctx["table"]) is dropped before the load and replaced by the loaded one (one copy on
    the GPU, one full version on disk)."""
    table = ctx["table"]
    root = table.store_root
    rows = table.info().num_rows
    big = rows > args.keep_one_above
    full_s, nbytes, made = [], 0, []
    for _ in range(1 if big else args.repeats):
        for v in made:                # the previous repeat's version: one at a time on disk
            shutil.rmtree(persistence.version_path(root, v))
        s, v = timed(lambda: table.snapshot(full=True), device)
        full_s.append(s)
        made = [v]
        nbytes = dir_bytes(persistence.version_path(root, v))
    out = {"full_snapshot_s": stats(full_s), "version_bytes": nbytes,
           "snapshot_gbps": nbytes / statistics.median(full_s) / 1e9}
    v_full = made[-1]
    if big:
        table.close()
        ctx["table"] = table = None
    load_s, cold, loaded = [], True, None
    for _ in range(1 if big else args.repeats):
        loaded = None
        reset_memory(device)
        cold = drop_caches() and cold
        s, loaded = timed(lambda: Shard.load(root, v_full, 0, device), device)
        load_s.append(s)
    out.update(load_s=stats(load_s), load_gbps=nbytes / statistics.median(load_s) / 1e9, load_cold=cold,
               **{f"load_{k}": x for k, x in memory(device).items()})
    if big:
        ctx["table"] = table = Table([loaded], store_root=root)
    else:
        out["load_bitwise_equal"] = _equal(table.shards[0], loaded)
    del loaded
    if rows <= args.incremental_max:
        out["incremental"] = _incremental(args, table, device, statistics.median(full_s))
    return out


def _equal(a: Shard, b: Shard) -> bool:
    with a._use(0) as sa, sa.lock, b._use(0) as sb, sb.lock:
        ta, tb = state_tensors(sa), state_tensors(sb)
        return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k].to(ta[k].device)) for k in ta)


def _incremental(args, table: Table, device: str, full_median_s: float) -> dict:
    root = table.store_root
    inc_s, inc_bytes, made = [], [], []
    for i in range(args.repeats):
        touch_rows(table, 0.01, 200 + i, device)
        s, v = timed(lambda: table.snapshot(), device)
        inc_s.append(s)
        made.append(v)
        inc_bytes.append(dir_bytes(persistence.version_path(root, v)))
    fmt = persistence.read_root_attrs(root, made[-1])["format"]
    out = {"changed_fraction": 0.01, "incremental_snapshot_s": stats(inc_s), "delta_bytes": stats(inc_bytes),
           "last_format": fmt, "speedup_1pct": full_median_s / statistics.median(inc_s),
           "chain_length": len(made)}
    reset_memory(device)
    cold = drop_caches()
    s_chain, chained = timed(lambda: Shard.load(root, made[-1], 0, device), device)
    out["chain_load_s"] = s_chain
    del chained
    s_compact, _ = timed(lambda: versions.compact(root, made[-1]), device)
    cold = drop_caches() and cold
    s_load, compacted = timed(lambda: Shard.load(root, made[-1], 0, device), device)
    out.update(compaction_s=s_compact, compacted_load_s=s_load, chain_loads_cold=cold,
               compacted_bitwise_equal_live=_equal(table.shards[0], compacted))
    return out


def swap(args, table: Table, device: str) -> dict:
    """Hot swaps between two published versions while client threads search and fetch:
    failed calls, and answers that are neither version's (a mix)."""
    n = table.info().num_rows
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:1024].sort().values.to(device)
    v1 = table.snapshot()
    before = table.fetch(probe).cpu()
    table.accumulate_value_grads(probe, torch.ones(probe.numel(), table.info().d_v, device=device),
                                 request_id="swap-change")
    table.end_step(table.info().step)
    v2 = table.snapshot()
    after = table.fetch(probe).cpu()
    q = torch.nn.functional.normalize(torch.randn(256, args.d_k, generator=torch.Generator().manual_seed(4)),
                                      dim=-1).to(device)
    counts = {"calls": 0, "failed": 0, "mixed": 0}
    errors_seen: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(kind: str) -> None:
        while not stop.is_set():
            try:
                if kind == "fetch":
                    got = table.fetch(probe).cpu()
                    bad = not (torch.equal(got, before) or torch.equal(got, after))
                else:
                    table.search(q, SEARCH_K)
                    bad = False
                with lock:
                    counts["calls"] += 1
                    counts["mixed"] += int(bad)
            except Exception as e:  # noqa: BLE001 -- counted: the point of the measure
                with lock:
                    counts["failed"] += 1
                    errors_seen.append(repr(e)[:200])
    threads = [threading.Thread(target=client, args=(k,), daemon=True)
               for k in ("fetch", "search") * args.swap_clients]
    for t in threads:
        t.start()
    swap_s = []
    reset_memory(device)
    for v in (v1, v2):
        time.sleep(0.2)
        swap_s.append(timed(lambda v=v: table.load_version(v), device)[0])
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    return {"swap_s": stats(swap_s), "client_threads": len(threads), **counts, "errors": errors_seen[:5],
            "versions": [v1, v2], **memory(device)}


def max_rows(args, device: str) -> dict:
    """Create tables of growing size on one device (default optimizer, one shard), each
    searched, fetched and stepped once; the largest that did all is the measure."""
    tried = []
    for label in args.max_rows_try:
        _, n = parse_rows(label)
        rec = {"label": label, "rows": n * n}
        table = None
        try:
            table, made = create(args, n, device)
            rec.update(create_s=made["create_s"], optimizer=made["optimizer"])
            search(argparse_like(args, repeats=1), table, device)
            fetch(argparse_like(args, repeats=1), table, device)
            touch_rows(table, min(1.0, FETCH_ROWS / (n * n)), 7, device)
            rec.update(ok=True, **memory(device))
        except (RuntimeError, MemoryError) as e:   # CUDA out of memory is a RuntimeError
            rec.update(ok=False, error=repr(e)[:300], **memory(device))
        finally:
            if table is not None:
                table.close()
            del table
            reset_memory(device)
            shutil.rmtree(table_root(args, n), ignore_errors=True)
        tried.append(rec)
    ok = [r["rows"] for r in tried if r.get("ok")]
    return {"tried": tried, "max_rows": max(ok) if ok else None}


def argparse_like(args, **changes):
    import argparse
    d = dict(vars(args))
    d.update(changes)
    return argparse.Namespace(**d)
