"""Readout and product-key search kernels: correctness on the GPU, then timings.

    python benchmarks/kernels.py [--out benchmarks/results/kernels.json] [--variants]

On a CUDA machine: checks the Triton kernels against the PyTorch reference
(fp64 where it matters) on fresh random inputs, then times, for T = 16384,
k = 32, d_v = 1024, N = 2^20, bf16 values:
  forward and forward+backward of the Triton kernels, the PyTorch eager
  reference and torch.compile of it; a device-to-device copy in the same run
  (the bandwidth ceiling); the two readout backward pipelines (first-occurrence and
  chunked) forced side by side, here and at the capacity model's training-step shape
  (T = 131072, k = 16, N = 123904, d_v = 128, fp32 values, skewed ids: hot rows);
  product-key search (16384 queries, n = 1024, k = 32, d = 64 per half) against the
  torch reference.
Timings: triton.testing.do_bench medians (it flushes L2 between calls), inputs
rotated over several sets. Writes JSON (also printed) with a `headline`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from store_service.kernels import reference as R  # noqa: E402

RESULT = {"checks": {}, "timings_ms": {}, "variants": {}, "notes": []}
SMOKE = os.environ.get("KBENCH_SMOKE") == "1"  # CPU + TRITON_INTERPRET: exercise the code paths only


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(fn, rep=200):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    return float(triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median"))


def rotating(fn, sets):
    state = {"i": 0}

    def call():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*s)
    return call


# ----------------------------------------------------------------------------
def check_readout(dev):
    from store_service.kernels import triton_readout as TR
    out = {}
    torch.manual_seed(1)
    cases = [(64, 7, 96, 50), (1000, 32, 1024, 1 << 16), (513, 1, 130, 300), (257, 32, 64, 40)]
    if SMOKE:
        cases = [(8, 3, 16, 10)]
    worst = 0.0
    for dt in (torch.float32, torch.bfloat16):
        for (T, K, D, N) in cases:
            V = torch.randn(N, D, device=dev).to(dt)
            ids = torch.randint(0, N, (T, K), device=dev)
            ids[torch.rand(T, K, device=dev) < 0.1] = -1
            ids[0] = -1
            if T > 3:
                ids[3] = ids[2]  # repeated rows across tokens
            s = torch.randn(T, K, device=dev) * 2
            g = torch.randn(T, D, device=dev)
            Vd = V.double()
            o = TR.softmax_readout_triton(V, ids, s)
            r = R.softmax_readout_reference(Vd, ids, s.double())
            e_f = rel(o, r)
            w = R.masked_softmax(s, ids)
            o2 = TR.readout_weighted_triton(V, ids, w)
            e_w = rel(o2, R.readout_weighted_reference(Vd, ids, w.double()))
            key = f"{str(dt).split('.')[-1]}_T{T}_k{K}_d{D}_N{N}"
            errs = dict(fwd=e_f, weighted_fwd=e_w)
            worst = max(worst, e_f, e_w)
            rgs, ru, rrg = R.softmax_readout_backward_reference(Vd, ids, s.double(), g.double())
            rgw, ru2, rrg2 = R.readout_weighted_backward_reference(Vd, ids, w.double(), g.double())
            for pipe in ("first", "chunked"):  # both backward pipelines, whichever the shape picks
                gs, u, rg = TR.softmax_readout_backward_triton(V, ids, s, g, pipeline=pipe)
                same_ids = bool(torch.equal(u, ru))
                gw, u2, rg2 = TR.readout_weighted_backward_triton(V, ids, w, g, pipeline=pipe)
                e = dict(grad_scores=rel(gs, rgs), row_grads=rel(rg, rrg) if same_ids else float("inf"),
                         grad_weights=rel(gw, rgw),
                         weighted_row_grads=rel(rg2, rrg2) if torch.equal(u2, ru2) else float("inf"))
                worst = max(worst, *e.values())
                errs.update({f"{k}_{pipe}": v for k, v in e.items()})
                errs[f"unique_ids_equal_{pipe}"] = same_ids
                errs[f"finite_{pipe}"] = bool(torch.isfinite(o).all() and torch.isfinite(rg).all())
            out[key] = errs
            log("check readout", key, {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in errs.items()})
    out["worst_rel_err"] = worst
    out["pass"] = worst < 1e-4
    return out


def check_pk(dev):
    from store_service.kernels import triton_pk_search as P
    out = {}
    torch.manual_seed(2)
    worst_id_mismatch = 0.0
    pk_cases = [(4096, 1024, 64, 32, False, torch.float32), (4096, 1024, 64, 32, True, torch.bfloat16),
                (999, 100, 48, 5, True, torch.float32), (64, 16, 16, 1, False, torch.float32),
                (512, (256, 1024), 64, 32, False, torch.float32), (300, 2048, 32, 64, True, torch.float32)]
    if SMOKE:
        pk_cases = [(16, 16, 16, 4, True, torch.float32)]
    for (B, n, d, k, bias, dt) in pk_cases:
        na, n = n if isinstance(n, tuple) else (n, n)  # rectangular: a shard's slice of codebook A
        qa = torch.randn(B, d, device=dev).to(dt)
        qb = torch.randn(B, d, device=dev).to(dt)
        ca = torch.randn(na, d, device=dev).to(dt)
        cb = torch.randn(n, d, device=dev).to(dt)
        ba = torch.randn(na, device=dev) if bias else None
        bb = torch.randn(n, device=dev) if bias else None
        s, i = P.product_key_search_triton(qa, qb, ca, cb, k, ba, bb)
        rs, ri = R.product_key_search_reference(qa, qb, ca, cb, k, ba, bb)
        mism = float((i != ri).float().mean())
        # our ids must carry our scores (a mismatch vs the reference is allowed only at ties)
        ia, ib = i // n, i % n
        recomputed = (qa.float() @ ca.float().T).gather(1, ia) + (qb.float() @ cb.float().T).gather(1, ib)
        if bias:
            recomputed = recomputed + ba[ia] + bb[ib]
        e_s = float((s - rs).abs().max())
        e_re = float((recomputed - s).abs().max())
        key = f"B{B}_na{na}_nb{n}_d{d}_k{k}_bias{int(bias)}_{str(dt).split('.')[-1]}"
        out[key] = dict(id_mismatch_frac=mism, max_abs_score_diff=e_s, max_abs_recompute_diff=e_re,
                        descending=bool((s[:, :-1] >= s[:, 1:]).all()) if k > 1 else True)
        worst_id_mismatch = max(worst_id_mismatch, mism)
        log("check pk", key, out[key])
    out["pass"] = all(v["max_abs_score_diff"] < 1e-3 and v["descending"] for v in out.values()
                      if isinstance(v, dict))
    return out


def kernel_breakdown(fn, iters=20):
    """GPU time per kernel name (ms per call of fn), from the torch profiler."""
    if SMOKE:
        return {}
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out[ev.key[:80]] = round(t / 1e3 / iters, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:16])


# ----------------------------------------------------------------------------
def time_readout(dev, variants: bool):
    from store_service.kernels import triton_readout as TR
    T, K, D, N = (16, 4, 32, 64) if SMOKE else (16384, 32, 1024, 1 << 20)
    elt = 2
    torch.manual_seed(3)
    n_sets = 3
    V = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    sets = []
    for _ in range(n_sets):
        ids = torch.randint(0, N, (T, K), device=dev)
        s = torch.randn(T, K, device=dev)
        g = torch.randn(T, D, device=dev)
        sets.append((V, ids, s, g))
    U = float(sum(torch.unique(st[1]).numel() for st in sets) / n_sets)

    tm = {}
    # bytes: gathered rows counted per occurrence for the gathers (as the issue does),
    # every other input read once, every output written once at its real size.
    fwd_bytes = T * K * D * elt + T * K * (8 + 4) + T * D * 4
    bwd_bytes = T * K * D * elt + T * D * 4 + T * K * (8 + 4 + 4) + U * D * 4 + U * 8
    # strict floor: each distinct row read once
    fwd_bytes_strict = U * D * elt + T * K * (8 + 4) + T * D * 4
    bwd_bytes_strict = U * D * elt + T * D * 4 + T * K * (8 + 4 + 4) + U * D * 4 + U * 8

    # copy ceiling
    a = torch.randn(1 << (10 if SMOKE else 29), device=dev, dtype=torch.bfloat16)  # 1 GiB
    b = torch.empty_like(a)
    t_copy = bench(lambda: b.copy_(a))
    copy_bw = 2 * a.numel() * 2 / (t_copy * 1e-3)
    tm["d2d_copy_1GiB"] = t_copy
    del a, b
    log(f"copy: {t_copy:.3f} ms  {copy_bw / 1e9:.0f} GB/s")

    def fwd(V, ids, s, g):
        return TR.softmax_readout_triton(V, ids, s)

    def fwdbwd(V, ids, s, g):
        TR.softmax_readout_triton(V, ids, s)
        return TR.softmax_readout_backward_triton(V, ids, s, g)

    def bwd(V, ids, s, g):
        return TR.softmax_readout_backward_triton(V, ids, s, g)

    tm["triton_fwd"] = bench(rotating(fwd, sets))
    RESULT["row_grad_config"] = list(TR._fo_config(D))
    tm["triton_bwd"] = bench(rotating(bwd, sets))
    tm["triton_fwdbwd"] = bench(rotating(fwdbwd, sets))
    log(f"triton fwd {tm['triton_fwd']:.3f}  bwd {tm['triton_bwd']:.3f}  fwd+bwd {tm['triton_fwdbwd']:.3f} ms")
    # the two backward pipelines forced (the auto rule picks first here: T*k < N)
    for pipe in ("first", "chunked"):
        tm[f"triton_bwd_{pipe}"] = bench(rotating(
            lambda V, ids, s, g, pipe=pipe: TR.softmax_readout_backward_triton(V, ids, s, g, pipeline=pipe), sets))
    log(f"bwd pipelines: first {tm['triton_bwd_first']:.3f}  chunked {tm['triton_bwd_chunked']:.3f} ms")

    # backward pieces, and the previous pipeline (sort, nonzero + host sync, one program
    # per unique row) in the same run
    tm["bwd_part_softmax"] = bench(rotating(lambda V, ids, s, g: TR.masked_softmax_triton(s, ids), sets))
    tm["bwd_part_sort"] = bench(rotating(lambda V, ids, s, g: torch.sort(ids.reshape(-1).to(torch.int32)), sets))

    def fwdbwd_previous(V, ids, s, g):
        TR.softmax_readout_triton(V, ids, s)
        w = TR.masked_softmax_triton(s, ids)
        return TR._readout_backward_sorted(V, ids, w, g)
    tm["triton_fwdbwd_previous_pipeline"] = bench(rotating(fwdbwd_previous, sets))
    log("bwd parts", {k: round(v, 4) for k, v in tm.items() if k.startswith("bwd_part")},
        "previous pipeline fwd+bwd", round(tm["triton_fwdbwd_previous_pipeline"], 4))

    tm_k = kernel_breakdown(rotating(fwdbwd, sets))
    if tm_k:
        RESULT["fwdbwd_kernel_breakdown_ms"] = tm_k
        log("fwd+bwd kernels (ms per call)", tm_k)

    if variants:
        fv = {}
        for cfg in [(1, 1024, 1024, 4), (2, 1024, 1024, 2), (1, 1024, 1024, 2), (1, 1024, 1024, 8)]:
            try:
                fv[str(cfg)] = bench(rotating(lambda V, ids, s, g: TR.softmax_readout_triton(V, ids, s, config=cfg), sets))
            except Exception as e:  # noqa: BLE001
                fv[str(cfg)] = repr(e)[:200]
            log("fwd variant (BLOCK_K, BLOCK_D, D_PER_PROG, warps)", cfg, fv[str(cfg)])
        RESULT["variants"]["fwd"] = fv
        bv = {}
        for cfg in [(1024, 2, True, True), (1024, 2, False, True), (1024, 2, True, False),
                    (1024, 2, False, False), (1024, 4, False, True), (512, 1, True, True)]:
            try:
                bv[str(cfg)] = bench(rotating(
                    lambda V, ids, s, g: TR.softmax_readout_backward_triton(V, ids, s, g, config=cfg), sets))
            except Exception as e:  # noqa: BLE001
                bv[str(cfg)] = repr(e)[:200]
            log("bwd variant (BLOCK_D, warps, G_EARLY, HINTS)", cfg, bv[str(cfg)])
        RESULT["variants"]["bwd"] = bv

    # PyTorch eager reference and torch.compile of it
    def ref_fwd(V, ids, s, g):
        return R.softmax_readout_reference(V, ids, s)

    def ref_fwdbwd_compact(V, ids, s, g):
        R.softmax_readout_reference(V, ids, s)
        return R.softmax_readout_backward_reference(V, ids, s, g)

    Vg = V.detach().requires_grad_(True)
    sets_g = [(Vg, st_[1], st_[2].clone().requires_grad_(True), st_[3]) for st_ in sets]

    def autograd_fwdbwd(f):
        def run(V, ids, s, g):
            V.grad = None
            s.grad = None
            out = f(V, ids, s)
            out.backward(g)
        return run

    tm["eager_fwd"] = bench(rotating(ref_fwd, sets), rep=60)
    tm["eager_fwdbwd_autograd"] = bench(rotating(autograd_fwdbwd(R.softmax_readout_reference), sets_g), rep=60)
    tm["eager_fwdbwd_compact"] = bench(rotating(ref_fwdbwd_compact, sets), rep=60)
    log("eager", {k: round(v, 3) for k, v in tm.items() if k.startswith("eager")})
    try:
        if SMOKE:
            raise RuntimeError("smoke mode: torch.compile skipped")
        cf = torch.compile(R.softmax_readout_reference)
        tm["compile_fwd"] = bench(rotating(lambda V, ids, s, g: cf(V, ids, s), sets), rep=60)
        tm["compile_fwdbwd_autograd"] = bench(rotating(autograd_fwdbwd(cf), sets_g), rep=60)
        cb = torch.compile(R.softmax_readout_backward_reference)
        tm["compile_fwdbwd_compact"] = bench(rotating(lambda V, ids, s, g: (cf(V, ids, s), cb(V, ids, s, g)), sets),
                                             rep=60)
    except Exception as e:  # noqa: BLE001
        RESULT["notes"].append("torch.compile failed: " + repr(e)[:300])
        traceback.print_exc()
    log("compile", {k: round(v, 3) for k, v in tm.items() if k.startswith("compile")})

    bw = {
        "copy_GBps": copy_bw / 1e9,
        "fwd_bytes": fwd_bytes, "fwdbwd_bytes": fwd_bytes + bwd_bytes,
        "fwd_bytes_strict": fwd_bytes_strict, "fwdbwd_bytes_strict": fwd_bytes_strict + bwd_bytes_strict,
        "unique_rows_per_step": U,
        "fwd_floor_ms": fwd_bytes / copy_bw * 1e3, "fwdbwd_floor_ms": (fwd_bytes + bwd_bytes) / copy_bw * 1e3,
        "triton_fwd_GBps": fwd_bytes / (tm["triton_fwd"] * 1e-3) / 1e9,
        "triton_fwdbwd_GBps": (fwd_bytes + bwd_bytes) / (tm["triton_fwdbwd"] * 1e-3) / 1e9,
    }
    bw["fwd_frac_of_copy"] = bw["triton_fwd_GBps"] * 1e9 / copy_bw
    bw["fwdbwd_frac_of_copy"] = bw["triton_fwdbwd_GBps"] * 1e9 / copy_bw
    bw["fwd_frac_of_copy_strict"] = fwd_bytes_strict / (tm["triton_fwd"] * 1e-3) / copy_bw
    bw["fwdbwd_frac_of_copy_strict"] = (fwd_bytes_strict + bwd_bytes_strict) / (tm["triton_fwdbwd"] * 1e-3) / copy_bw
    RESULT["timings_ms"]["readout"] = tm
    RESULT["readout_bandwidth"] = bw
    RESULT["readout_shape"] = dict(T=T, k=K, d_v=D, N=N, dtype="bfloat16", input_sets=n_sets)
    log("bandwidth", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in bw.items()})
    return tm, bw


def time_bwd_pipelines(dev, variants: bool):
    """The two backward pipelines side by side at the capacity model's training-step shape
    (T = 32,768 tokens x 4 heads, k = 16, over a 123,904-row table of d_v = 128, fp32
    values): ~17 pairs per row and hot rows, where the first-occurrence pipeline walks
    long segments (benchmarks/results/launch_count_cuda.json). Ids are skewed:
    id = perm[floor(N * u^2)], u uniform, so P(row) ~ 1/sqrt(rank) and the hottest row
    gets ~T*k/sqrt(N) pairs. Checks both against the fp64 reference, and the chunked one
    for determinism (two calls, the same bits)."""
    from store_service.kernels import triton_readout as TR
    from store_service.kernels.triton_readout_chunked import ChunkedConfig
    T, K, D, N = (64, 4, 16, 40) if SMOKE else (131072, 16, 128, 123904)
    torch.manual_seed(5)
    V = torch.randn(N, D, device=dev)
    sets = []
    for _ in range(3):
        rows = torch.randperm(N, device=dev)
        ids = rows[(N * torch.rand(T, K, device=dev) ** 2).long().clamp_max(N - 1)]
        sets.append((V, ids, torch.randn(T, K, device=dev), torch.randn(T, D, device=dev)))
    counts = torch.bincount(sets[0][1].flatten(), minlength=N)
    out = dict(shape=dict(T=T, k=K, d_v=D, N=N, dtype="float32", ids="perm[floor(N * u^2)]",
                          unique_rows=int((counts > 0).sum()), hottest_row_pairs=int(counts.max()),
                          pairs_per_used_row=T * K / max(int((counts > 0).sum()), 1)))
    V0, ids0, s0, g0 = sets[0]
    ref = R.softmax_readout_backward_reference(V0.double(), ids0, s0.double(), g0.double())
    checks = {}
    for pipe in ("first", "chunked"):
        gs, u, rg = TR.softmax_readout_backward_triton(V0, ids0, s0, g0, pipeline=pipe)
        same = bool(torch.equal(u, ref[1]))
        checks[pipe] = dict(unique_ids_equal=same, grad_scores=rel(gs, ref[0]),
                            row_grads=rel(rg, ref[2]) if same else float("inf"))
    again = [TR.softmax_readout_backward_triton(V0, ids0, s0, g0, pipeline="chunked") for _ in range(2)]
    checks["chunked_deterministic"] = all(torch.equal(a, b) for a, b in zip(*again))
    checks["pass"] = checks["chunked_deterministic"] and all(
        max(checks[p]["grad_scores"], checks[p]["row_grads"]) < 1e-4 for p in ("first", "chunked"))
    out["checks"] = checks
    del ref, again
    log("bwd pipelines at the capacity shape", out["shape"], checks)
    tm = {}
    for pipe in ("first", "chunked"):
        fn = rotating(lambda V, ids, s, g, pipe=pipe: TR.softmax_readout_backward_triton(V, ids, s, g, pipeline=pipe),
                      sets)
        tm[f"bwd_{pipe}"] = bench(fn, rep=100)
        out[f"kernel_breakdown_ms_{pipe}"] = kernel_breakdown(fn, iters=5)
        log(f"capacity-shape bwd {pipe}: {tm[f'bwd_{pipe}']:.3f} ms", out[f"kernel_breakdown_ms_{pipe}"])
    out["timings_ms"] = tm
    if variants:
        cv = {}
        for cfg in [ChunkedConfig(), ChunkedConfig(num_warps=8), ChunkedConfig(chunk=128),
                    ChunkedConfig(chunk=32), ChunkedConfig(d_step=16), ChunkedConfig(d_step=64, num_warps=8),
                    ChunkedConfig(block_d=64), ChunkedConfig(carry_span=4)]:
            name = f"chunk{cfg.chunk}_bd{cfg.block_d}_step{cfg.d_step}_w{cfg.num_warps}_span{cfg.carry_span}"
            try:
                cv[name] = bench(rotating(
                    lambda V, ids, s, g, cfg=cfg: TR.softmax_readout_backward_triton(V, ids, s, g, config=cfg), sets),
                    rep=100)
            except Exception as e:  # noqa: BLE001
                cv[name] = repr(e)[:200]
            log("chunked bwd variant", name, cv[name])
        out["chunked_variants_ms"] = cv
    RESULT["bwd_pipelines_capacity"] = out
    return tm


def triton_cdiv(a, b):
    return (a + b - 1) // b


def time_pk(dev, variants: bool):
    from store_service.kernels import triton_pk_search as P
    B, n, d, k = (16, 32, 16, 4) if SMOKE else (16384, 1024, 64, 32)
    torch.manual_seed(4)
    tm = {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).split(".")[-1]
        sets = []
        for _ in range(3):
            sets.append((torch.randn(B, d, device=dev).to(dt), torch.randn(B, d, device=dev).to(dt),
                         torch.randn(n, d, device=dev).to(dt), torch.randn(n, d, device=dev).to(dt)))
        tm[f"torch_ref_{name}"] = bench(rotating(lambda a, b, c, e: R.product_key_search_reference(a, b, c, e, k), sets))
        tm[f"triton_{name}"] = bench(rotating(lambda a, b, c, e: P.product_key_search_triton(a, b, c, e, k), sets))
        log(f"pk {name}: torch {tm[f'torch_ref_{name}']:.3f} ms  triton {tm[f'triton_{name}']:.3f} ms")
        # the two parts: the reference's score GEMMs alone (both halves), the selection alone
        tm[f"scores_only_{name}"] = bench(rotating(lambda a, b, c, e: (P._scores(a, c, None), P._scores(b, e, None)),
                                                   sets))
        log(f"pk {name}: score GEMMs alone {tm[f'scores_only_{name}']:.3f} ms")
        if variants and not SMOKE:
            pv = {}
            for nw in (1, 2, 4):
                try:
                    pv[f"num_warps={nw}"] = bench(rotating(
                        lambda a, b, c, e: P.product_key_search_triton(a, b, c, e, k, num_warps=nw), sets))
                except Exception as ex:  # noqa: BLE001
                    pv[f"num_warps={nw}"] = repr(ex)[:200]
                log("pk variant", name, nw, pv[f"num_warps={nw}"])
            RESULT["variants"][f"pk_{name}"] = pv
    RESULT["timings_ms"]["pk_search"] = tm
    RESULT["pk_shape"] = dict(queries=B, n=n, d_half=d, k=k)
    return tm


def plot(json_path: str) -> str:
    """Bar chart of the readout times (ms) next to the JSON: kernels.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = json.load(open(json_path))
    t = d.get("readout_timings_ms_run3") or d["timings_ms"]["readout"]
    bw = d.get("readout_bandwidth_run3") or d["readout_bandwidth"]
    names = ["copy floor", "Triton", "torch.compile", "eager"]
    fwd = [bw["fwd_floor_ms"], d["headline"]["readout_fwd_ms"], t["compile_fwd"], t["eager_fwd"]]
    fb = [bw["fwdbwd_floor_ms"], d["headline"]["readout_fwdbwd_ms"],
          min(t["compile_fwdbwd_autograd"], t["compile_fwdbwd_compact"]),
          min(t["eager_fwdbwd_autograd"], t["eager_fwdbwd_compact"])]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], fwd, 0.4, label="forward")
    ax.bar([i + 0.2 for i in x], fb, 0.4, label="forward + backward")
    for i in x:
        ax.text(i - 0.2, fwd[i], f"{fwd[i]:.2f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, fb[i], f"{fb[i]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms")
    ax.set_title(f"readout T=16384 k=32 d_v=1024 N=2^20 bf16, {d['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    out = os.path.splitext(json_path)[0] + ".png"
    fig.savefig(out, dpi=120)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG for an existing kernels.json")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "kernels.json"))
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--bwd-pipelines", action="store_true",
                    help="only the readout backward's two pipelines at the capacity shape (~1 min)")
    args = ap.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if SMOKE:
        dev = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    else:
        dev = "cuda"
    import triton
    RESULT["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)"
    RESULT["versions"] = dict(torch=torch.__version__, triton=triton.__version__,
                              has_tl_topk=hasattr(triton.language, "topk"))
    RESULT["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from benchmarks.common import provenance
    RESULT["provenance"] = provenance(device="cuda" if dev == "cuda" else "cpu (smoke)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def dump():
        with open(args.out, "w") as f:
            json.dump(RESULT, f, indent=1, default=str)

    if args.bwd_pipelines:
        tm = time_bwd_pipelines(dev, args.variants)
        cap = RESULT["bwd_pipelines_capacity"]
        RESULT["headline"] = {"shape": cap["shape"], "checks_pass": cap["checks"]["pass"],
                              "bwd_first_ms": tm["bwd_first"], "bwd_chunked_ms": tm["bwd_chunked"],
                              "first_over_chunked": tm["bwd_first"] / tm["bwd_chunked"]}
        dump()
        print(json.dumps(RESULT["headline"], indent=1))
        return
    t0 = time.time()
    if not args.skip_checks:
        for name, fn in (("readout", check_readout), ("pk_search", check_pk)):
            try:
                RESULT["checks"][name] = fn(dev)
            except Exception:  # noqa: BLE001
                RESULT["checks"][name] = {"pass": False, "error": traceback.format_exc()[-1500:]}
                traceback.print_exc()
            dump()
    log(f"checks done in {time.time() - t0:.0f} s")
    tm = bw = pk = None
    try:
        tm, bw = time_readout(dev, args.variants)
    except Exception:  # noqa: BLE001
        RESULT["notes"].append("readout timing failed: " + traceback.format_exc()[-1500:])
        traceback.print_exc()
    dump()
    cap = None
    try:
        cap = time_bwd_pipelines(dev, args.variants)
    except Exception:  # noqa: BLE001
        RESULT["notes"].append("backward pipelines timing failed: " + traceback.format_exc()[-1500:])
        traceback.print_exc()
    dump()
    try:
        pk = time_pk(dev, args.variants)
    except Exception:  # noqa: BLE001
        RESULT["notes"].append("pk timing failed: " + traceback.format_exc()[-1500:])
        traceback.print_exc()
    head = {}
    if tm and bw:
        head["readout_fwd_bw_frac"] = bw["fwd_frac_of_copy"]
        head["readout_fwdbwd_bw_frac"] = bw["fwdbwd_frac_of_copy"]
        # the two byte counts side by side: per gathered occurrence (above) and the strict one,
        # each distinct row's bytes once (what a reader of "x% of copy bandwidth" may assume)
        head["readout_fwd_bw_frac_strict_unique_rows"] = bw.get("fwd_frac_of_copy_strict")
        head["readout_fwdbwd_bw_frac_strict_unique_rows"] = bw.get("fwdbwd_frac_of_copy_strict")
        comp = [tm[k] for k in ("compile_fwdbwd_autograd", "compile_fwdbwd_compact") if k in tm]
        if comp:
            head["readout_fwdbwd_speedup_vs_compile"] = min(comp) / tm["triton_fwdbwd"]
        head["readout_fwd_ms"] = tm["triton_fwd"]
        head["readout_fwdbwd_ms"] = tm["triton_fwdbwd"]
    if cap:
        head["capacity_bwd_first_ms"] = cap["bwd_first"]
        head["capacity_bwd_chunked_ms"] = cap["bwd_chunked"]
        head["capacity_bwd_chunked_speedup"] = cap["bwd_first"] / cap["bwd_chunked"]
    if pk:
        head["pk_search_speedup_vs_torch"] = pk["torch_ref_float32"] / pk["triton_float32"]
        head["pk_search_speedup_vs_torch_bf16"] = pk["torch_ref_bfloat16"] / pk["triton_bfloat16"]
    RESULT["headline"] = head
    dump()
    log(f"total {time.time() - t0:.0f} s")
    print(json.dumps(RESULT, indent=1, default=str))
    log("HEADLINE", json.dumps(head))


if __name__ == "__main__":
    main()
