"""Top-k over flat (one key per row) keys: exact chunked matmul + top-k, or faiss.

Score of row r for query q: q . key_r + bias_r. Ablated rows are never
returned. Both paths return local row indices (0..R-1), padded with -1 and
-inf where fewer than k rows are selectable, scores sorted descending.
"""
from __future__ import annotations

import torch

PAD_ID = -1


def _pad(scores: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = idx.masked_fill(torch.isneginf(scores), PAD_ID)
    if scores.shape[1] < k:
        extra = k - scores.shape[1]
        scores = torch.nn.functional.pad(scores, (0, extra), value=float("-inf"))
        idx = torch.nn.functional.pad(idx, (0, extra), value=PAD_ID)
    return scores, idx


_SCORE_ELEMS = 1 << 25  # a chunk's score block is at most 128 MiB of fp32


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, bias: torch.Tensor | None = None,
               ablated: torch.Tensor | None = None, chunk_rows: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [B, d] fp32, keys [R, d], bias [R], ablated [R] bool ->
    (scores [B, k] fp32, local ids [B, k] int64). Memory O(B * chunk_rows);
    by default chunk_rows keeps the score block near 128 MiB."""
    B, R = queries.shape[0], keys.shape[0]
    if chunk_rows is None:
        chunk_rows = max(4096, _SCORE_ELEMS // max(B, 1))
    best_s = queries.new_full((B, 0), float("-inf"), dtype=torch.float32)
    best_i = torch.empty(B, 0, dtype=torch.int64, device=queries.device)
    q = queries.float()
    for lo in range(0, R, chunk_rows):
        hi = min(lo + chunk_rows, R)
        s = q @ keys[lo:hi].float().T  # [B, hi-lo]
        if bias is not None:
            s = s + bias[lo:hi].float()
        if ablated is not None:
            s = s.masked_fill(ablated[lo:hi], float("-inf"))
        ts, ti = s.topk(min(k, hi - lo), dim=1)
        best_s = torch.cat([best_s, ts], dim=1)
        best_i = torch.cat([best_i, ti + lo], dim=1)
        if best_s.shape[1] > k:
            best_s, pos = best_s.topk(k, dim=1)
            best_i = best_i.gather(1, pos)
    return _pad(best_s, best_i, k)


class FaissFlatIndex:
    """A faiss index over (keys | bias) with ablated rows left out.

    The bias rides in one extra dimension: [q, 1] . [key, b] = q.key + b, so an
    inner-product index returns selection scores directly. Built once and
    reused until the owner calls `invalidate` (keys, bias or masks changed).
    """

    def __init__(self, factory: str = "Flat", nprobe: int = 16, gpu: bool = False):
        """gpu: build the index on the GPU the keys live on, where faiss has GPU support."""
        self.factory = factory
        self.nprobe = nprobe
        self.gpu = gpu
        self._index = None
        self._rows: torch.Tensor | None = None  # faiss position -> local row

    def invalidate(self) -> None:
        self._index = None

    def _build(self, keys: torch.Tensor, bias: torch.Tensor | None, ablated: torch.Tensor | None) -> None:
        import faiss  # lazy: only shards with large flat segments need it
        rows = torch.arange(keys.shape[0])
        k = keys.detach().float().cpu()
        b = torch.zeros(k.shape[0]) if bias is None else bias.detach().float().cpu()
        if ablated is not None:
            keep = ~ablated.cpu()
            rows, k, b = rows[keep], k[keep], b[keep]
        data = torch.cat([k, b.unsqueeze(1)], dim=1).contiguous().numpy()
        index = faiss.index_factory(data.shape[1], self.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(data)
        index.add(data)
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        if self.gpu and keys.is_cuda and faiss_gpus() > 0:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, keys.device.index or 0, index)
        self._index, self._rows = index, rows

    def search(self, queries: torch.Tensor, keys: torch.Tensor, k: int, bias: torch.Tensor | None = None,
               ablated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as `exact_topk`."""
        if self._index is None:
            self._build(keys, bias, ablated)
        device = queries.device
        q = queries.detach().float().cpu()
        q = torch.cat([q, torch.ones(q.shape[0], 1)], dim=1).contiguous().numpy()
        kk = min(k, self._index.ntotal)
        if kk == 0:
            return _pad(torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.int64), k)
        s, pos = self._index.search(q, kk)
        s, pos = torch.from_numpy(s), torch.from_numpy(pos)
        valid = pos >= 0
        idx = torch.where(valid, self._rows[pos.clamp_min(0)], torch.full_like(pos, PAD_ID))
        s = s.masked_fill(~valid, float("-inf"))
        s, idx = _pad(s, idx, k)
        return s.to(device), idx.to(device)


def faiss_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, bias: torch.Tensor | None = None,
               ablated: torch.Tensor | None = None, factory: str = "Flat") -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot faiss search (builds the index each call); see FaissFlatIndex."""
    return FaissFlatIndex(factory).search(queries, keys, k, bias, ablated)


def faiss_gpus() -> int:
    """GPUs faiss can use here (0 without faiss, or with its CPU build)."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def flat_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, bias: torch.Tensor | None = None, *,
              backend: str = "auto", chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over many flat rows (a shard's millions), as the scale benchmark times it:
    backend "faiss" (an exact IndexFlatIP, on the keys' GPU where faiss has GPU support),
    "torch" (`exact_topk`: chunked, memory O(B x chunk_rows)), or "auto": faiss on the GPU
    where both are there, else torch. Same contract as `exact_topk`."""
    if backend == "auto":
        backend = "faiss" if keys.is_cuda and faiss_gpus() > 0 else "torch"
    if backend == "torch":
        return exact_topk(queries, keys, k, bias, chunk_rows=chunk_rows)
    if backend == "faiss":
        return FaissFlatIndex("Flat", gpu=True).search(queries, keys, k, bias)
    raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
