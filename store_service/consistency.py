"""Step consistency of a table's shards, and recovery when they disagree.

A shard restarted from a published version comes back at that version's step while
the others have gone on training: gradients it received since are lost and the table's
rows no longer come from one step. `agreed` refuses (FAILED_PRECONDITION naming the
shard) to let such a table train or publish; `recover` rolls every shard back to the
last published version, from which training resumes (with the checkpoint saved with it).
"""
from __future__ import annotations

from collections import Counter

from . import errors, persistence


def agreed(table) -> tuple[int, int]:
    """(version, step) every shard of `table` is at; FailedPrecondition naming the first
    shard that differs from the most common (version, step) otherwise."""
    infos = [d.info for d in table._each(lambda i, s: s.describe())]
    (version, step), _ = Counter((i.version, i.step) for i in infos).most_common(1)[0]
    for shard, info in zip(table.shards, infos):
        if (info.version, info.step) != (version, step):
            where = getattr(shard, "address", "in process")
            raise errors.ShardsDisagree(
                f"shard {info.shard_id} ({where}) is at version {info.version} step {info.step}, the others at "
                f"version {version} step {step}; Table.recover() rolls every shard back to the last published "
                "version")
    return version, step


def needs_check(table) -> bool:
    """Only shards in other processes can restart behind the table's back."""
    from .shard import Shard
    return not all(isinstance(s, Shard) for s in table.shards)


def recover(table, version: int | None = None) -> tuple[int, int]:
    """Roll every shard back to published `version` (default: the latest) -> (version, step)
    all shards are then at. Gradients not yet applied are dropped with the old states."""
    if table.store_root is None:
        raise errors.FailedPrecondition("recover: this table has no store_root")
    if version is None:
        version = persistence.latest_version(table.store_root)
        if version is None:
            raise errors.NotFound(f"no published version under {table.store_root}")
    try:
        table.flush()
    except errors.StoreError:
        pass   # gradients meant for the states being dropped
    table.load_version(version)
    return agreed(table)
