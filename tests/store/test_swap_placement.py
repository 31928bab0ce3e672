"""A hot swap keeps a shard where it was placed: a host shard loaded page-locked (a Ray shard
actor's rows = "host") stays page-locked when it swaps to a version that was published by a
table whose rows were not (e.g. created on a GPU, or unpinned), and the other way round."""
import torch

from store_service.config import TableConfig
from store_service.shard import Shard
from store_service.table import Table


def _publish(root, pin: bool) -> int:
    t = Table.create(TableConfig(d_k=8, d_v=16, segments=[("flat", 32)], pin_memory=pin), str(root))
    try:
        return t.snapshot()
    finally:
        t.close()


def _pinned_after_swap(root, load_pin: bool, target: int, first: int) -> tuple[bool, bool]:
    s = Shard.load(str(root), first, 0, "cpu", load_pin)
    s.prepare_version(str(root), target)
    s.flip_version(target)
    s.release_version(first)
    st = s._serving
    assert st.version == target
    # where CUDA exists the rows themselves are page-locked as the flag says
    if torch.cuda.is_available():
        assert st.values.is_pinned() == load_pin and s.memory()["pinned"] == load_pin
    return st.config.pin_memory, s.memory()["device"] == "cpu"


def test_host_shard_stays_pinned_across_a_swap(tmp_path):
    unpinned = _publish(tmp_path, pin=False)
    pinned = _publish(tmp_path, pin=True)
    assert _pinned_after_swap(tmp_path, True, target=unpinned, first=pinned) == (True, True)
    assert _pinned_after_swap(tmp_path, False, target=pinned, first=unpinned) == (False, True)
