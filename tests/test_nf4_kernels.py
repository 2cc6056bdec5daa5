"""Every NF4 kernel against reference/nf4.py, bit for bit: C++ (CPU), CUDA (GPU only)."""

import pytest
import torch

from helpers import BLOCKSIZES, DTYPES, SIZES, weight
from qlora_kernels import _native
from qlora_kernels import reference as R
from qlora_kernels.ops import nf4 as ops


def test_native_module_is_built_with_cpu_kernels():
    assert _native.native() is not None, _native.native_error()
    assert ops.nf4_quantize_blocks._backend_fns.keys() >= {"cpu"}


def _double_quant(absmax):
    offset = absmax.mean()
    return offset, *ops.quantize_blockwise_8bit(absmax - offset, R.dynamic_code(absmax.device), 256)


def _check_against_reference(w, blocksize, dtype):
    packed, absmax = ops.nf4_quantize_blocks(w, blocksize)
    ref_packed, ref_absmax = R.nf4_quantize_blocks(w.cpu(), blocksize)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), ref_absmax)

    offset, absmax_q, nested = _double_quant(absmax)
    ref_q, ref_nested = R.quantize_blockwise_8bit(ref_absmax - offset.cpu(), R.dynamic_code(), 256)
    assert torch.equal(absmax_q.cpu(), ref_q)
    assert torch.equal(nested.cpu(), ref_nested)

    shape = list(w.shape)
    code = R.dynamic_code(w.device)
    for out_dtype in DTYPES:
        plain = ops.nf4_dequantize(packed, absmax, None, None, None, blocksize, 256, shape, out_dtype)
        assert torch.equal(plain.cpu(), R.nf4_dequantize(ref_packed, ref_absmax, blocksize, shape, out_dtype))
        dq = ops.nf4_dequantize(packed, absmax_q, nested, code, offset, blocksize, 256, shape, out_dtype)
        want = R.nf4_dequantize(ref_packed, ref_q, blocksize, shape, out_dtype, ref_nested, code.cpu(), offset.cpu())
        assert torch.equal(dq.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_cpu_kernels_match_reference(n, blocksize, dtype):
    _check_against_reference(weight(n, dtype), blocksize, dtype)


@pytest.mark.parametrize("shape", [(0,), (0, 64), (1,), (1, 1)])
def test_cpu_kernels_empty_and_single(shape):
    _check_against_reference(weight(shape), 64, torch.float32)


def test_cpu_kernels_multithreaded_large():
    # large enough for several threads; results must not depend on the split
    w = weight((1536, 1024), torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        _check_against_reference(w, 64, torch.bfloat16)
        packed_many, _ = ops.nf4_quantize_blocks(w, 64)
        torch.set_num_threads(1)
        packed_one, _ = ops.nf4_quantize_blocks(w, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(packed_many, packed_one)


def test_non_contiguous_input():
    w = weight((96, 130)).t()
    assert not w.is_contiguous()
    packed, absmax = ops.nf4_quantize_blocks(w, 64)
    ref_packed, ref_absmax = R.nf4_quantize_blocks(w.contiguous(), 64)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)


def test_fp16_output_rounding_covers_subnormals_and_overflow_edges():
    # values whose products land on fp16 subnormals and near 65504 exercise the hand-written
    # fp32 -> fp16 rounding
    w = torch.cat([torch.linspace(-7e-5, 7e-5, 4096), torch.linspace(-65000, 65000, 4096)])
    packed, absmax = ops.nf4_quantize_blocks(w, 64)
    out = ops.nf4_dequantize(packed, absmax, None, None, None, 64, 256, [w.numel()], torch.float16)
    assert torch.equal(out, R.nf4_dequantize(packed, absmax, 64, [w.numel()], torch.float16))


@pytest.mark.parametrize(
    "op, args",
    [
        (ops.nf4_quantize_blocks, lambda: (weight(1000, torch.bfloat16), 64)),
        (ops.quantize_blockwise_8bit, lambda: (torch.randn(300), R.dynamic_code(), 256)),
        (ops.nf4_dequantize, lambda: (*ops.nf4_quantize_blocks(weight(130), 32), None, None, None, 32, 256, [130],
                                      torch.bfloat16)),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(op, args())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("n", (1, 65, 4096 + 17, 4096 * 4096 + 33))
def test_cuda_kernels_match_reference(n, blocksize, dtype):
    _check_against_reference(weight(n, dtype, device="cuda"), blocksize, dtype)


@pytest.mark.gpu
def test_cuda_dequantize_unaligned_output_and_input():
    # the CUDA kernel's 16-byte vector path must fall back cleanly on odd offsets
    base = torch.empty(4096 * 3 + 1, dtype=torch.uint8, device="cuda")
    w = weight(8192 + 64, torch.bfloat16, device="cuda")
    packed, absmax = ops.nf4_quantize_blocks(w, 64)
    shifted = base[1 : 1 + packed.numel()]
    shifted.copy_(packed)
    out = ops.nf4_dequantize(shifted, absmax, None, None, None, 64, 256, [w.numel()], torch.bfloat16)
    assert torch.equal(out.cpu(), R.nf4_dequantize(packed.cpu(), absmax.cpu(), 64, [w.numel()], torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_non_finite_absmax_from_a_corrupted_checkpoint_matches_reference(dtype):
    packed, absmax = ops.nf4_quantize_blocks(weight(64 * 6 + 10), 64)
    absmax[1], absmax[3], absmax[6] = float("nan"), float("inf"), float("-inf")
    out = ops.nf4_dequantize(packed, absmax, None, None, None, 64, 256, [packed.numel() * 2], dtype)
    want = R.nf4_dequantize(packed, absmax, 64, [packed.numel() * 2], dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("n", [64 * 5, 64 * 5 + 7])
def test_absmax_propagates_nan_and_inf_like_torch_amax(n, device):
    # the public quantize refuses non-finite weights from absmax alone
    for pos in (3, 64 * 2 + 5, n - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            w = weight(n).to(device)
            w[pos] = bad
            _, absmax = ops.nf4_quantize_blocks(w, 64)
            _, ref_absmax = R.nf4_quantize_blocks(w.cpu(), 64)
            torch.testing.assert_close(absmax.cpu(), ref_absmax, rtol=0, atol=0, equal_nan=True)
            assert not torch.isfinite(absmax[pos // 64])
