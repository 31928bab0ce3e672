"""Loss-free balancing of one shard state's selection biases (DESIGN.md section 4).

After each step every bias moves by bias_step against the sign of its load error
over that step, in the spirit of DeepSeek-V3's MoE balancing. Load and mean are
over this shard's rows: flat rows one by one (ablated rows and rows outside
partition 0 left out: they are never read, so their load says nothing), product
rows through their two sub-keys. The bias affects selection only, never the weights.
The caller holds the state's lock.
"""
from __future__ import annotations

import torch

from .state import ShardState


def balance(st: ShardState) -> None:
    step = st.config.bias_step
    if st.flat_ids.numel():
        live = ~st.ablated[st.flat_local]
        if st.outside_top_k is not None:
            live = live & ~st.outside_top_k
        if bool(live.any()):
            load = st.step_hits[st.flat_local].double()
            err = torch.sign(load - load[live].mean()).float() * live
            st.flat_bias -= step * err
            st.mark_dense("flat_bias")   # every live flat row's bias moves: written whole
            if st.faiss is not None:
                st.faiss.invalidate()
    for pc in st.pieces:
        n = pc.seg.n_sub
        lo = pc.local_lo - st.row_start
        load = st.step_hits[lo:lo + (pc.i1 - pc.i0) * n].double().reshape(-1, n)
        la, lb = load.sum(1), load.sum(0)
        pc.bias_a[pc.i0:pc.i1] -= step * torch.sign(la - la.mean()).float()
        pc.bias_b -= step * torch.sign(lb - lb.mean()).float()
