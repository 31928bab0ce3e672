"""store_service.wire: the one tensor <-> Tensor message conversion."""
from __future__ import annotations

import pytest
import torch

from protos import knowledge_store_pb2 as pb
from store_service import errors, wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool])
def test_round_trip_is_bitwise_for_every_dtype(dtype):
    t = (torch.randn(3, 5, 2) * 100).to(dtype)
    msg = pb.Tensor.FromString(wire.to_proto(t).SerializeToString())
    assert msg.dtype == wire.dtype_name(dtype) and list(msg.shape) == [3, 5, 2]
    assert len(msg.data) == t.numel() * t.element_size()  # raw bytes, never repeated numbers
    back = wire.from_proto(msg, "x")
    assert back.dtype == dtype and torch.equal(back, t)


def test_bfloat16_is_raw_two_bytes_little_endian():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert wire.to_proto(t).data == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_non_contiguous_and_empty_and_scalar():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    assert torch.equal(wire.from_proto(wire.to_proto(t), "x"), t)
    e = wire.from_proto(wire.to_proto(torch.zeros(0, 7)), "x")
    assert e.shape == (0, 7)
    s = wire.from_proto(wire.to_proto(torch.tensor(3.5)), "x")
    assert s.shape == () and float(s) == 3.5


def test_ids_narrow_to_int32_only_when_they_fit_and_widen_back():
    small = torch.tensor([[0, -1], [5, 2**31 - 1]])
    msg = wire.ids_to_proto(small)
    assert msg.dtype == "int32"
    back = wire.from_proto(msg, "ids", ids=True)
    assert back.dtype == torch.int64 and torch.equal(back, small)
    big = torch.tensor([2**31, 1])
    assert wire.ids_to_proto(big).dtype == "int64"
    assert torch.equal(wire.from_proto(wire.ids_to_proto(big), "ids", ids=True), big)


@pytest.mark.parametrize("msg, match", [
    (pb.Tensor(), "missing"),
    (pb.Tensor(dtype="float16", shape=[2], data=b"\0" * 4), "unknown dtype"),
    (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "24 bytes"),
    (pb.Tensor(dtype="float32", shape=[-1, 3], data=b""), "negative dimension"),
])
def test_malformed_messages_name_the_field(msg, match):
    with pytest.raises(errors.InvalidArgument, match=match) as info:
        wire.from_proto(msg, "queries")
    assert info.value.field == "queries"


def test_dtype_and_rank_expectations():
    msg = wire.to_proto(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(errors.InvalidArgument, match="expected float32") as info:
        wire.from_proto(msg, "weights", dtypes=("float32",))
    assert info.value.field == "weights"
    with pytest.raises(errors.InvalidArgument, match="expected 1 dimensions"):
        wire.from_proto(msg, "ids", ndim=1)
    with pytest.raises(errors.InvalidArgument, match="int64 or int32"):
        wire.from_proto(wire.to_proto(torch.zeros(3)), "ids", ids=True)
    with pytest.raises(errors.InvalidArgument, match="cannot travel"):
        wire.to_proto(torch.zeros(2, dtype=torch.float16))


@pytest.mark.parametrize("shape", [(3, 5), (4, 8), (1, 1), (0, 4), (7, 13)])
def test_slot_mask_round_trip_packs_lsb_first(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0] * 31 + shape[1])) < 0.5
    msg = wire.slots_to_proto(mask, pb.SlotMask())
    assert len(msg.bits) == (mask.numel() + 7) // 8
    assert torch.equal(wire.slots_from_proto(msg), mask)
    if mask.numel():   # the documented layout: numpy's packbits, little bit order
        import numpy as np
        assert msg.bits == np.packbits(mask.reshape(-1).numpy(), bitorder="little").tobytes()


def test_scatter_slots_puts_entries_back_in_row_major_order():
    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = wire.scatter_slots(mask, torch.tensor([7, 8, 9]), -1, "ids")
    assert out.tolist() == [[7, -1, 8], [-1, 9, -1]]
    with pytest.raises(errors.InvalidArgument, match="ids: expected 3 entries"):
        wire.scatter_slots(mask, torch.tensor([7, 8]), -1, "ids")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
def test_cuda_tensors_encode_through_pinned_memory_bitwise(dtype):
    t = (torch.randn(300, 7) * 100).to(dtype)
    got = wire.from_proto(wire.to_proto(t.cuda()[:, 1:5]), "t")   # non-contiguous on the GPU
    assert got.dtype == dtype and torch.equal(got, t[:, 1:5])
    mask = torch.rand(33, 5) < 0.5
    assert torch.equal(wire.slots_from_proto(wire.slots_to_proto(mask.cuda(), pb.SlotMask()), device="cuda").cpu(),
                       mask)
