"""reference/nf4.py against bitsandbytes itself (CPU backend): the spec must be the format."""

import bitsandbytes.functional as F
import pytest
import torch

from helpers import BLOCKSIZES, DTYPES, SIZES, bnb_dequantize, bnb_quantize, weight
from qlora_kernels import reference as R


def test_codebooks_equal_bitsandbytes():
    assert torch.equal(R.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(R.dynamic_code(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_reference_is_bitsandbytes(n, blocksize, dtype):
    w = weight(n, dtype)
    packed, qs = bnb_quantize(w, blocksize)
    ref_packed, absmax = R.nf4_quantize_blocks(w, blocksize)
    assert torch.equal(ref_packed, packed.view(-1))
    offset = absmax.mean()
    assert torch.equal(offset, qs.offset)
    absmax_q, nested = R.quantize_blockwise_8bit(absmax - offset, R.dynamic_code(), R.NESTED_BLOCKSIZE)
    assert torch.equal(absmax_q, qs.absmax)
    assert torch.equal(nested, qs.state2.absmax)
    out = R.nf4_dequantize(ref_packed, absmax_q, blocksize, (n,), dtype, nested, R.dynamic_code(), offset)
    assert torch.equal(out, bnb_dequantize(packed, qs).view(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (37, 256), (5, 4096)])
def test_reference_dequantize_2d_matches_bitsandbytes_kernels(shape, dtype):
    # 2-D shapes go through bitsandbytes' C++ (AVX512 where present) dequantize kernel.
    # Rows must be a multiple of the blocksize: for e.g. (64, 96) that kernel indexes absmax
    # per row and returns wrong values on AVX512 CPUs (a bitsandbytes 0.50 bug; the flat
    # layout, which its CUDA and 1-D paths and we follow, is the format).
    w = weight(shape, dtype)
    packed, qs = bnb_quantize(w, 64, double_quant=False)
    out = R.nf4_dequantize(packed, qs.absmax, 64, shape, dtype)
    assert torch.equal(out, bnb_dequantize(packed, qs))


def test_blockwise_8bit_rule_of_zero_blocks():
    a = torch.zeros(300)
    a[260] = 0.5
    q, absmax = R.quantize_blockwise_8bit(a, R.dynamic_code(), 256)
    bq, bstate = F.quantize_blockwise(a, blocksize=256)
    assert torch.equal(q, bq) and torch.equal(absmax, bstate.absmax)
    assert absmax[0] == 0 and (q[:256] == 0).all()
