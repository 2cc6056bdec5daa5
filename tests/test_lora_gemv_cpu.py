"""The CPU decode GEMV (C++ `_C.lora_gemv_nf4_cpu` through backends/lora_gemv_cpu.py) against the
reference: its weights bit for bit those of `reference.nf4_dequantize`, its outputs as accurate
as the same math in plain torch ops in the dtype (the 2x rule against a float64 product)."""

from __future__ import annotations

import pytest
import torch

from qlora_kernels._native import native
from qlora_kernels.backends.lora_gemv_cpu import MAX_ROWS, lora_gemv_cpu
from qlora_kernels.nf4 import nf4_quantize
from qlora_kernels.nf4_weight import NF4Weight

pytestmark = pytest.mark.skipif(native() is None, reason="native module not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _nf4(shape, blocksize, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, state = nf4_quantize(torch.randn(shape, generator=g), blocksize, double_quant=double_quant)
    return NF4Weight(packed, state)


@pytest.fixture
def threads():
    """Sets torch's thread count (the GEMV's) for one test, then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape, blocksize", [((37, 301), 64), ((5, 4097), 4096), ((64, 96), 32), ((3, 1), 32),
                                              ((300, 33), 128), ((2, 64), 2048), ((9, 700), 512)])
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_those_of_the_reference_bit_for_bit(shape, blocksize, double_quant, dtype):
    """x = rows of the identity: y[m] is column k_m of W, which must be exactly the reference's
    dequantized value (rows starting inside a block and inside a byte included)."""
    N, K = shape
    nf4 = _nf4(shape, blocksize, double_quant)
    W = nf4.dequantize_reference(dtype)
    eye = torch.eye(K, dtype=dtype)
    for first in range(0, K, MAX_ROWS):
        cols = slice(first, min(K, first + MAX_ROWS))
        y = lora_gemv_cpu(eye[cols], nf4, None, None, None, 0.0)
        assert y.dtype == dtype and y.shape == (cols.stop - first, N)
        assert torch.equal(y, W[:, cols].t()), (first, (y.float() - W[:, cols].t().float()).abs().max())


def _problem(M, N, K, rank, dtype, with_bias, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    nf4 = _nf4((N, K), blocksize, double_quant, seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    xa = torch.randn(M, rank, generator=g) if rank else None
    lora_B = (torch.randn(N, rank, generator=g) * 0.1).to(dtype) if rank else None
    return nf4, x, bias, xa, lora_B


def _assert_as_accurate_as_torch(y, nf4, x, bias, xa, lora_B, scaling):
    dtype = x.dtype
    W = nf4.dequantize_reference(dtype)
    exact = x.double() @ W.double().t()
    plain = torch.nn.functional.linear(x, W, bias)
    if bias is not None:
        exact += bias.double()
    if xa is not None:
        exact += scaling * (xa.double() @ lora_B.double().t())
        plain = plain + (scaling * (xa @ lora_B.float().t())).to(dtype)
    assert y.dtype == dtype and y.shape == exact.shape
    err = (y.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err <= 2 * err_plain + 1e-6 * exact.abs().max().item(), f"error {err:.3g} vs plain {dtype} {err_plain:.3g}"


@pytest.mark.parametrize("M", (1, 2, 3, 7, 16))
@pytest.mark.parametrize("rank", (0, 1, 16, 64))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_as_accurate_as_plain_torch(M, rank, with_bias, dtype):
    nf4, x, bias, xa, lora_B = _problem(M, 67, 513, rank, dtype, with_bias)
    y = lora_gemv_cpu(x, nf4, bias, xa, lora_B, 0.75)
    _assert_as_accurate_as_torch(y, nf4, x, bias, xa, lora_B, 0.75)


@pytest.mark.parametrize("blocksize", (32, 64, 128, 256, 512, 1024, 2048, 4096))
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("shape", ((33, 4096), (17, 1000), (8, 4099)))
def test_every_blocksize_and_layout(blocksize, double_quant, shape):
    """K a multiple of the blocksize or not, odd K (rows starting mid-byte), a partial last block."""
    nf4, x, bias, xa, lora_B = _problem(5, *shape, 16, torch.bfloat16, True, blocksize, double_quant)
    y = lora_gemv_cpu(x, nf4, bias, xa, lora_B, 2.0)
    _assert_as_accurate_as_torch(y, nf4, x, bias, xa, lora_B, 2.0)


@pytest.mark.parametrize("num_threads", (1, 2, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_counts_give_the_same_output(num_threads, dtype, threads):
    """Threads split output features only: every count gives the one-thread result bit for bit
    (4 x 1031 x 1024 is work enough for 8 threads)."""
    nf4, x, bias, xa, lora_B = _problem(4, 1031, 1024, 8, dtype, True)
    threads(1)
    one = lora_gemv_cpu(x, nf4, bias, xa, lora_B, 0.5)
    threads(num_threads)
    y = lora_gemv_cpu(x, nf4, bias, xa, lora_B, 0.5)
    assert torch.equal(y, one)
    _assert_as_accurate_as_torch(y, nf4, x, bias, xa, lora_B, 0.5)


@pytest.mark.parametrize("double_quant", (False, True))
def test_nan_absmax_propagates_to_its_rows_only(double_quant):
    nf4 = _nf4((6, 128), 64, double_quant)
    absmax = nf4.state.nested_absmax if double_quant else nf4.absmax
    absmax[0] = float("nan")  # block 0 (plain) or the first 256 blocks (double quant)
    y = lora_gemv_cpu(torch.ones(2, 128, dtype=torch.bfloat16), nf4, None, None, None, 0.0)
    rows_hit = 6 if double_quant else 1
    assert torch.isnan(y[:, :rows_hit]).all() and not torch.isnan(y[:, rows_hit:]).any()


def test_bad_input_raises():
    nf4, x, bias, xa, lora_B = _problem(2, 8, 64, 4, torch.float32, True)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        lora_gemv_cpu(torch.randn(17, 64), nf4, None, None, None, 0.0)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        lora_gemv_cpu(torch.randn(0, 64), nf4, None, None, None, 0.0)
    with pytest.raises(ValueError, match="x has 63 features"):
        lora_gemv_cpu(torch.randn(2, 63), nf4, None, None, None, 0.0)
    with pytest.raises(ValueError, match="2-D fp32/fp16/bf16"):
        lora_gemv_cpu(x.double(), nf4, None, None, None, 0.0)
    with pytest.raises(ValueError, match="both xa and lora_B"):
        lora_gemv_cpu(x, nf4, bias, xa, None, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[8, r\]"):
        lora_gemv_cpu(x, nf4, bias, xa, lora_B[:7], 1.0)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        lora_gemv_cpu(x, nf4, bias[:5], None, None, 1.0)
    with pytest.raises(ValueError, match="xa is on meta"):
        lora_gemv_cpu(x, nf4, bias, xa.to("meta"), lora_B, 1.0)


@pytest.mark.parametrize("M, blocksize, rank, match", [
    (0, 64, 0, r"M \(rows of x\) must be in \[1, 16\], got 0"), (17, 64, 0, r"got 17"),
    (1, 48, 0, "blocksize must be a power of two in \\[32, 4096\\], got 48"), (1, 64, -1, "rank must be >= 0, got -1"),
])
def test_the_native_entry_refuses_bad_sizes(M, blocksize, rank, match):
    nf4 = _nf4((8, 64), 64, False)
    x, y = torch.randn(16, 64), torch.empty(16, 8)
    with pytest.raises(ValueError, match=match):
        native().lora_gemv_nf4_cpu(x.data_ptr(), 0, M, 64, *nf4.native_pointers(), 256, blocksize, 8, 0, 0, 0, rank,
                                   1.0, y.data_ptr(), 1)
