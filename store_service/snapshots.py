"""What a shard writes for a snapshot: its whole state, or a delta over the version its
state was loaded from or last published as (`deltas`).

A state knows its `Base` (a published version whose content its data equals but for the
rows marked dirty since) and the last snapshot it wrote (`Pending`). Whether that
snapshot was published is learnt from the disk at the next one (the shard is not told:
the table publishes by a rename after every shard has written): if its subgroup is there
with the content id it was written with, it is the new base and only rows changed since
count; else (the publish failed) the old base stays and the rows of both count. So a
failed publish never loses a change, and no extra call is needed to commit one.

The caller holds the state's lock; the data returned are the state's own tensors (or
gathers of their changed rows): `persistence.start_shard` copies them to the host chunk
by chunk, under that lock, its writes already running.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch

from . import deltas, persistence


@dataclass(frozen=True)
class Base:
    store_root: str
    version: int
    content_id: str
    chain: int      # deltas between it and a full version


@dataclass
class Pending:
    base: Base              # the version written
    previous: Base | None   # the base before it
    dirty: torch.Tensor     # rows changed between `previous` and the snapshot
    dense: set[str]


def base_of(store_root: str, version: int, attrs: dict) -> Base | None:
    """The base a state loaded from `version` (shard attrs `attrs`) starts from; None for
    versions written before content ids (the first snapshot after them is full)."""
    cid = attrs.get("content_id")
    if cid is None:
        return None
    return Base(os.path.realpath(store_root), version, cid, int(attrs.get("chain", 0)))


def _published(b: Base, shard_id: int) -> bool:
    a = persistence.shard_attrs(persistence.version_path(b.store_root, b.version), shard_id)
    return a is not None and a.get("content_id") == b.content_id


def _current(st) -> tuple[Base | None, torch.Tensor, set[str]]:
    """(base, rows changed since it, arrays changed wholesale since it), settling the
    last snapshot's fate."""
    p = st.pending
    if p is None:
        return st.base, st.dirty, set(st.dense)
    if _published(p.base, st.shard_id):
        return p.base, st.dirty, set(st.dense)
    n = p.dirty.numel()
    merged = st.dirty.clone()
    merged[:n] |= p.dirty.to(merged.device)
    return p.previous, merged, p.dense | st.dense


def take(st, tensors: dict[str, torch.Tensor], attrs: dict, version_dir: str, full: bool
         ) -> persistence.ShardData:
    """The data of the state's snapshot into staged `version_dir`: a delta over the state's
    base when it can be one (same store, parent still published as it was, compatible
    arrays, chain under deltas.MAX_CHAIN, few enough rows changed) and `full` is False,
    else the whole state. Resets the dirty rows, keeping them until the next snapshot
    learns whether this one was published."""
    store_root = os.path.realpath(persistence.store_root_of(version_dir))
    base, dirty, dense = _current(st)
    parent = None
    if not full and base is not None and base.store_root == store_root:
        parent = persistence.shard_attrs(persistence.version_path(store_root, base.version), st.shard_id)
    ok = (parent is not None and parent.get("content_id") == base.content_id
          and parent.get("layout") is not None and base.chain < deltas.MAX_CHAIN
          and parent.get("row_start") == st.row_start and parent.get("row_end", 0) <= st.row_end
          and deltas.compatible(parent["layout"], tensors)
          and int(dirty.sum()) <= deltas.MAX_DIRTY_FRACTION * dirty.numel())
    cid = uuid.uuid4().hex
    if ok:
        role_attrs, arrays = deltas.make(tensors, dirty, dense, st.flat_pos)
        layout = deltas.layout(tensors)
        out = dict(attrs, format=deltas.DELTA_FORMAT, delta_parent=base.version, chain=base.chain + 1,
                   content_id=cid, layout=layout, **role_attrs)
        data = persistence.ShardData(out, arrays)
        chain = base.chain + 1
    else:
        data = persistence.ShardData(dict(attrs, content_id=cid, chain=0), dict(tensors))
        chain = 0
    st.pending = Pending(Base(store_root, int(attrs["version"]), cid, chain), base, dirty, dense)
    st.dirty = torch.zeros_like(st.dirty)
    st.dense = set()
    return data
