"""The NF4 type: every field of a quant state and the packed bytes are checked when built, and
the ops refuse what the type refuses, before any kernel reads memory."""

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qlora_kernels as qk
from qlora_kernels import reference
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight
from qlora_kernels.ops import lora as lora_ops
from qlora_kernels.ops import nf4 as nf4_ops

SHAPE = (64, 96)  # 6144 elements: 96 blocks of 64, 1 nested block


@pytest.fixture(scope="module")
def dq():
    return qk.nf4_quantize(torch.randn(SHAPE), 64, double_quant=True)


@pytest.fixture(scope="module")
def plain():
    return qk.nf4_quantize(torch.randn(SHAPE), 64, double_quant=False)


def test_a_quantized_weight_is_accepted_and_round_trips_through_op_args(dq):
    packed, state = dq
    w = NF4Weight(packed, state)
    args = w.op_args()
    back = NF4Weight.from_op_args(*args, SHAPE, torch.float32)
    assert back.packed.data_ptr() == w.packed.data_ptr() and back.absmax is state.absmax and back.nested_code is state.nested_code
    assert (back.blocksize, back.nested_blocksize, tuple(back.shape)) == (64, 256, SHAPE)
    assert torch.equal(back.dequantize_reference(), qk.nf4_dequantize(packed, state))


def test_native_pointers_place_plain_and_nested_scales(dq, plain):
    packed, state = plain
    assert NF4Weight(packed, state).native_pointers() == (packed.data_ptr(), state.absmax.data_ptr(), 0, 0, 0, 0)
    packed, state = dq
    assert NF4Weight(packed, state).native_pointers() == (
        packed.data_ptr(), 0, state.absmax.data_ptr(), state.nested_absmax.data_ptr(),
        state.nested_code.data_ptr(), state.offset.data_ptr())


def test_quant_storage_is_viewed_as_bytes_not_copied():
    packed, state = qk.nf4_quantize(torch.randn(SHAPE), 64, quant_storage=torch.bfloat16)
    w = NF4Weight(packed, state)
    assert w.packed.dtype == torch.uint8 and w.packed.numel() == 6144 // 2
    assert w.packed.data_ptr() == packed.data_ptr()


# one case per field of the state: (field, bad value builder, message)
BAD_DQ_FIELDS = [
    ("absmax", lambda s: s.absmax[:2].clone(), "absmax has 2 elements, expected 96"),
    ("absmax", lambda s: torch.cat([s.absmax, s.absmax[:1]]), "absmax has 97 elements, expected 96"),
    ("absmax", lambda s: s.absmax.float(), "absmax has dtype torch.float32, expected torch.uint8"),
    ("nested_absmax", lambda s: torch.cat([s.nested_absmax, s.nested_absmax]), "nested_absmax has 2 elements, expected 1"),
    ("nested_absmax", lambda s: s.nested_absmax.half(), "nested_absmax has dtype torch.float16"),
    ("nested_code", lambda s: s.nested_code[:255].clone(), "nested_code has 255 elements, expected 256"),
    ("nested_code", lambda s: s.nested_code.double(), "nested_code has dtype torch.float64"),
    ("offset", lambda s: torch.zeros(2), "offset has 2 elements, expected 1"),
    ("offset", lambda s: s.offset.half(), "offset has dtype torch.float16"),
    ("code", lambda s: s.code[:15].clone(), "code has 15 elements, expected 16"),
    ("code", lambda s: s.code.half(), "code has dtype torch.float16"),
    ("code", lambda s: torch.linspace(-1, 1, 16), "code is not the NF4 codebook"),
    ("absmax", lambda s: s.absmax.to("meta"), "nested_absmax is on cpu, the rest of the weight on meta"),
    ("nested_code", lambda s: s.nested_code.to("meta"), "nested_code is on meta, the rest of the weight on cpu"),
]


@pytest.mark.parametrize("field, bad, match", BAD_DQ_FIELDS, ids=[f"{f}-{i}" for i, (f, _, _) in
                                                                  enumerate(BAD_DQ_FIELDS)])
def test_each_bad_tensor_of_a_double_quant_state_is_refused(dq, field, bad, match):
    _, state = dq
    with pytest.raises(ValueError, match=match):
        state.with_tensors(**{field: bad(state)})


def test_plain_absmax_must_be_fp32_with_one_value_per_block(plain):
    _, state = plain
    with pytest.raises(ValueError, match="absmax has dtype torch.uint8, expected torch.float32"):
        state.with_tensors(absmax=state.absmax.to(torch.uint8))
    with pytest.raises(ValueError, match="absmax has 95 elements, expected 96"):
        state.with_tensors(absmax=state.absmax[:95].clone())


@pytest.mark.parametrize("missing", ("nested_absmax", "nested_code", "offset"))
def test_double_quant_needs_all_three_nested_fields(dq, missing):
    _, state = dq
    with pytest.raises(ValueError, match="double quant needs nested_absmax, nested_code and offset together"):
        replace(state, **{missing: None})


@pytest.mark.parametrize("field, value, match", [
    ("blocksize", 48, "blocksize=48 is not allowed"),
    ("nested_blocksize", 0, "nested_blocksize must be a positive power of two, got 0"),
    ("nested_blocksize", 96, "nested_blocksize must be a positive power of two, got 96"),
    ("shape", (64, -96), "negative size"),
    ("dtype", torch.int8, "dtype torch.int8 is not one of"),
    ("shape", (64, 97), "absmax has 96 elements, expected 97"),
])
def test_each_bad_size_field_is_refused(dq, field, value, match):
    _, state = dq
    with pytest.raises(ValueError, match=match):
        replace(state, **{field: value})


def test_shape_must_be_a_sequence_of_ints(dq):
    _, state = dq
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        replace(state, shape=(64.0, 96))


@pytest.mark.parametrize("nbytes, match", [(3071, "packed holds 3071 bytes but a weight of shape"),
                                           (3073, "packed holds 3073 bytes")])
def test_packed_must_hold_exactly_the_bytes_of_the_shape(dq, nbytes, match):
    packed, state = dq
    with pytest.raises(ValueError, match=match):
        NF4Weight(torch.zeros(nbytes, dtype=torch.uint8), state)


def test_packed_on_another_device_is_refused(dq):
    packed, state = dq
    with pytest.raises(ValueError, match="packed is on meta but its quant state on cpu"):
        NF4Weight(packed.to("meta"), state)


def test_hand_built_state_is_refused_before_dequantize_and_lora(dq):
    """A 2-element absmax for a whole weight used to be read 94 blocks past its end."""
    packed, state = dq
    bad = replace(state, absmax=state.absmax[:2].clone(), shape=(64, 2), dtype=torch.float32)  # consistent alone
    x = torch.randn(3, 96)
    A, B = torch.randn(4, 96), torch.randn(64, 4)
    with pytest.raises(ValueError, match="packed holds 3072 bytes but a weight of shape"):
        qk.nf4_dequantize(packed, bad)
    with pytest.raises(ValueError, match="packed holds 3072 bytes"):
        qk.lora_linear(x, (packed, bad), None, A, B, 1.0)


@pytest.mark.parametrize("device", ("cpu", "meta"))
def test_direct_op_calls_are_checked(dq, device):
    """The ops rebuild the weight from their arguments: the CPU kernel and the fake (meta)
    implementation refuse a short absmax before any memory is read."""
    packed, state = (t.to(device) if isinstance(t, torch.Tensor) else t for t in dq)
    state = state.to(device)
    short = state.absmax[:2]
    with pytest.raises(ValueError, match="absmax has 2 elements, expected 96"):
        nf4_ops.nf4_dequantize(packed, short, state.nested_absmax, state.nested_code, state.offset, 64, 256,
                               list(SHAPE), torch.float32)
    x = torch.randn(3, 96, device=device)
    A, B = torch.randn(4, 96, device=device), torch.randn(64, 4, device=device)
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="absmax has 2 elements, expected 96"):
        lora_ops.lora_linear_fwd(x, None, packed, short, state.nested_absmax, state.nested_code, state.offset, 64,
                                 256, 64, None, A, B, 1.0, 0.0, seed)
    with pytest.raises(ValueError, match="exactly one of weight"):
        lora_ops.lora_linear_fwd(x, None, None, None, None, None, None, 0, 0, 64, None, A, B, 1.0, 0.0, seed)


def test_fake_tensors_are_checked_without_reading_values():
    with FakeTensorMode():
        packed = torch.empty(32, dtype=torch.uint8, device="cuda:0")
        absmax = torch.empty(2, device="cuda:0")
        with pytest.raises(ValueError, match="absmax has 2 elements, expected 4"):
            nf4_ops.nf4_dequantize(packed, absmax, None, None, None, 32, 256, [8, 16], torch.bfloat16)
        out = nf4_ops.nf4_dequantize(packed, absmax, None, None, None, 32, 256, [8, 8], torch.bfloat16)
        assert out.shape == (8, 8) and out.device.type == "cuda"


def test_quantize_ops_check_their_arguments():
    with pytest.raises(ValueError, match="blocksize=48 is not allowed"):
        nf4_ops.nf4_quantize_blocks(torch.randn(8, 64), 48)
    with pytest.raises(ValueError, match="NF4 quantizes"):
        nf4_ops.nf4_quantize_blocks(torch.randn(8, 64).double(), 64)
    with pytest.raises(ValueError, match="code has 255 entries"):
        nf4_ops.quantize_blockwise_8bit(torch.randn(300), reference.dynamic_code()[:255], 256)
    with pytest.raises(ValueError, match="must be float32"):
        nf4_ops.quantize_blockwise_8bit(torch.randn(300).half(), reference.dynamic_code(), 256)


def test_bitsandbytes_state_is_accepted():
    import bitsandbytes.functional as F

    from qlora_kernels.patching.quantize import nf4_state_from_bnb

    # a last dim of a multiple of 64: bitsandbytes' CPU dequantize reads flat blocks only then
    w = torch.randn(48, 128)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state = nf4_state_from_bnb(qs)
    assert torch.equal(qk.nf4_dequantize(packed, state), F.dequantize_4bit(packed, qs))


def test_nf4linear_checks_its_state_once_and_again_after_a_move():
    layer = qk.NF4Linear.from_linear(torch.nn.Linear(96, 64))
    first = layer.quant_state
    assert layer.quant_state is first and layer.nf4_weight.state is first
    layer.to("meta")
    moved = layer.quant_state
    assert moved is not first and moved.absmax.device.type == "meta" and moved.absmax is layer.absmax
