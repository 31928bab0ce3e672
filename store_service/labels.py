"""Version labels: what the number a request names means, and how it moves.

Every state a shard holds carries a label (`ShardState.version`), and a request naming a
version is answered only by a state of that label (`Shard._resolve`). A table pins each of
its shards to the label its map holds, so an answer never mixes versions as long as one label
never names two different states across the table at the same time. A label is:

- a published number: the state loaded from that version, or the serving state that wrote
  it (`Table.snapshot` relabels the serving states with the number it published, once the
  publish succeeded, so a label is never a number older than the state's last publish);
- an unpublished label (>= UNPUBLISHED, never a version on disk, drawn at random so that it
  is never reused): a state disowned before a swap reloads its number.

A state keeps its label while it trains, so a label names one lineage, not fixed bytes: a
state labelled v1 that trained since differs from what v1 is on disk. Loading v1 again while
such a state is held would put two states under v1, and while the shards flip one by one a
request pinned to v1 would be answered by the new v1 on one shard and the trained state on
another. Hence (`Table.load_version`): before any shard loads `v`, every shard relabels the
states it holds under `v` (serving, retiring, kept for leases) to one fresh unpublished label,
so no shard answers `v` from an old state once one can answer it from the loaded bytes;
requests pinned to `v` meanwhile get StaleVersion and their table refreshes (onto the new
label, the old state, or after the flip onto `v`). A shard refuses to prepare a
number a request would reach it holds (`check_not_held`), so a swap driver that skips this
step fails instead of mixing. A lease pins a state, not a number (`leases.VersionLeases.find`):
a piece whose lease's state was relabelled gets StaleVersion, never rows of another state
under its number (so the table's disowning step moves states kept for leases too: their
readers read again, on the new label).
"""
from __future__ import annotations

import secrets
from typing import Iterable

from . import errors

UNPUBLISHED = 1 << 62   # labels from here on are never published version numbers


def unpublished_label() -> int:
    """A fresh label for a disowned state: never a published number, and (random, 61 bits)
    never one another swap of this store drew."""
    return UNPUBLISHED + secrets.randbits(61)


def is_published(label: int) -> bool:
    return 0 < label < UNPUBLISHED


def check_not_held(held: Iterable, version: int, shard_id: int) -> None:
    """Before a shard loads published `version`: no state that a request reaches by its number
    (`held`: serving, retiring; a prepared one is that version's bytes already) may carry that
    label. A retired state is reached only through its leases, which name it exactly."""
    for st in held:
        if st.version == version:
            raise errors.FailedPrecondition(
                f"shard {shard_id} holds a state labelled {version} (it may have trained since it was "
                f"loaded or published as {version}); relabel it first (relabel_version with an "
                f"unpublished label, as Table.load_version does), so that {version} never names two states")


def relabel(serving, others: Iterable, prepared: Iterable, version: int, new_version: int,
            shard_id: int) -> int:
    """Give the states labelled `version` the label `new_version` -> how many moved.

    new_version published (a snapshot's number): only `serving`, and only where its last
    snapshot written is `new_version` (the state whose bytes were published as it); the
    others keep their labels. new_version unpublished: `serving` and every state in `others`
    (retiring, retired for leases) labelled `version`. `prepared` states (loaded, not yet
    flipped: the published bytes of their number) never move. The caller holds the shard's
    version lock."""
    others, prepared = list(others), list(prepared)
    if new_version != version and any(st.version == new_version for st in [serving, *others, *prepared]):
        raise errors.FailedPrecondition(f"shard {shard_id} already holds a state labelled {new_version}")
    if is_published(new_version):
        if serving.version != version:
            return 0
        wrote = serving.pending.base.version if serving.pending is not None else None
        if wrote != new_version:
            raise errors.FailedPrecondition(
                f"shard {shard_id}: the serving state last wrote version {wrote}, not {new_version}; only the "
                f"state whose snapshot was published as {new_version} may take that label")
        serving.version = new_version
        return 1
    moved = 0
    for st in [serving, *others]:
        if st.version == version:
            st.version = new_version
            moved += 1
    return moved
