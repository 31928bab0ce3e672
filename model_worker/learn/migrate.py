"""Store versions written before detectors had a partition of their own.

Before the store spoke generic tags (format 1), `learn` kept a row's cue and gate labels
in the arrays `flat_cue` / `flat_gate`, and a row with both was a detector, which the
store itself kept out of the top-k. Today's store reads those arrays as the tags "cue"
and "gate" but puts every format-1 row in partition 0, where a detector would be read
like any other row. `migrate` rewrites such a version in place (format 2, detectors in
gating.DETECTOR_PARTITION; staged, synced and swapped in atomically by
`store_service.versions.rewrite_version`); nothing else in it changes.

    python -m model_worker.learn.migrate STORE_ROOT [--version V]   # default: every version

Loading a checkpoint in-process (`model_worker.checkpoint.open_checkpoint_table`) runs
it on the checkpoint's version first. Shard servers already serving a version keep what
they loaded: migrate before serving it.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from store_service import errors
from store_service.persistence import (ShardData, list_versions, read_root_attrs, read_shard, shard_format,
                                       tag_array_name, version_path)
from store_service.versions import rewrite_version

from ..gating import CUE_TAG, DETECTOR_PARTITION, GATE_TAG


def _detectors(data: ShardData) -> np.ndarray:
    """[flat rows] bool: the rows with both a cue and a gate."""
    cue, gate = data.arrays.get(tag_array_name(CUE_TAG)), data.arrays.get(tag_array_name(GATE_TAG))
    if cue is None or gate is None:
        return np.zeros(data.arrays["flat_ids"].shape[0], dtype=bool)
    return (cue >= 0) & (gate >= 0)


def needs_migration(store_root: str, version: int) -> bool:
    """Whether `version` is in format 1 and holds detectors (read by today's store, they
    would sit in partition 0)."""
    vdir = version_path(store_root, version)
    shards = [s["shard_id"] for s in read_root_attrs(store_root, version)["shards"]]
    old = [i for i in shards if shard_format(vdir, i) == 1]
    return any(bool(_detectors(read_shard(vdir, i)).any()) for i in old)


def _detectors_to_their_partition(data: ShardData) -> ShardData:
    partition = np.where(_detectors(data), DETECTOR_PARTITION, 0).astype(np.int64)
    return ShardData(data.attrs, {**data.arrays, "flat_partition": partition})


def migrate(store_root: str, version: int) -> bool:
    """Rewrite `version` with its detectors in DETECTOR_PARTITION if it needs it; whether it did."""
    if not needs_migration(store_root, version):
        return False
    rewrite_version(store_root, version, _detectors_to_their_partition)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rewrite store versions written before detectors had their own "
                                             "partition (format 1 with cue and gate labels) in place.")
    ap.add_argument("store_root")
    ap.add_argument("--version", type=int, default=None, help="one version (default: every published version)")
    args = ap.parse_args(argv)
    versions = [args.version] if args.version is not None else list_versions(args.store_root)
    if not versions:
        sys.exit(f"migrate: no published versions under {args.store_root}")
    try:
        for v in versions:
            print(f"version {v}: {'migrated' if migrate(args.store_root, v) else 'nothing to do'}")
    except (errors.StoreError, OSError) as e:
        sys.exit(f"migrate: {e}")


if __name__ == "__main__":
    main()
