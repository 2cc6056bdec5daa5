"""Triton NF4 dequantize, bit-identical to `qlora_kernels.reference.nf4_dequantize`.

Layout: `packed` holds (n + 1) // 2 bytes, element 2i in the high nibble and 2i+1 in the
low one; element i scales by absmax[i // blocksize]. With double quant, absmax holds
uint8 codes and absmax[b] = nested_code[code_b] * nested_absmax[b // nested_blocksize]
+ offset in fp32.

No FMA: the double-quant product must be rounded before `+ offset`, as bitsandbytes and
the reference do. On NVIDIA, LLVM's NVPTX backend and ptxas both contract a separate
`a * b` and `+ c` into one fma.rn.f32 whenever fp fusion is on (Triton 3.6's
default; 3.9 turned it off), so writing them as two statements does not help. Two
guards are used:

* `_mul_rn` emits inline PTX `mul.rn.f32`. LLVM cannot look inside inline asm, and
  ptxas never fuses a mul carrying an explicit rounding modifier (PTX ISA, `mul`).
  This is local to the code, so fused kernels calling the helpers below keep the exact
  rounding whatever their own launch options. `tl.inline_asm_elementwise` exists since
  Triton 2.2. libdevice `mul_rn` is avoided: LLVM's NVVM instcombine may rewrite
  `llvm.nvvm.mul.rn.f` back into a plain `fmul`, which can then be contracted again.
* The launcher also passes `enable_fp_fusion=False` (a launch option since Triton 2.2;
  from 3.9 on, leaving it out warns), which stops LLVM and ptxas (`--fmad=false`) from
  fusing anything else in this kernel.

The interpreter (TRITON_INTERPRET=1) cannot run inline asm, so the PTX path is a
constexpr switch (`NV_PTX`) that the launcher turns off there; numpy never fuses, so
plain fp32 `*` is already exact in that mode.

bf16 output: on NVIDIA `.to(tl.bfloat16)` is cvt.rn (round to nearest even), but the
interpreter (checked in 3.9) truncates fp32 -> bf16, so with `NV_PTX` off the rounding
is done on the bits instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_kernels import reference
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.triton._common import _cast_rn, _interpreting

__all__ = ["nf4_dequantize_triton", "nf4_dequant_values", "nf4_absmax_values"]

# Elements per program. One byte feeds two neighbouring lanes; the duplicate load is
# served by L1, and output stores (2-4 bytes per element) dominate the traffic.
BLOCK_SIZE = 1024
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _mul_rn(a, b, NV_PTX: tl.constexpr):
    """fp32 a * b rounded to nearest even, never contracted into an FMA (see module doc)."""
    if NV_PTX:
        prod = tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        prod = a * b
    return prod


@triton.jit
def nf4_absmax_values(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, mask,
                      nested_blocksize, DOUBLE_QUANT: tl.constexpr, NV_PTX: tl.constexpr):
    """fp32 absmax of the NF4 blocks `block_idx` (any shape; int64 when products may pass 2**31).

    Without DOUBLE_QUANT `absmax_ptr` is fp32 absmax. With it, `absmax_ptr` holds uint8
    codes and the value is nested_code[code] * nested_absmax[block // nested_blocksize]
    + offset (`offset_ptr` points at one fp32), the product rounded before the add.
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        nested = tl.load(nested_absmax_ptr + block_idx // nested_blocksize, mask=mask, other=0.0)
        absmax = _mul_rn(scale, nested, NV_PTX) + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_dequant_values(packed_ptr, code_ptr, absmax, elem_idx, mask, NV_PTX: tl.constexpr):
    """fp32 NF4[code_i] * absmax for flat element indices `elem_idx` (any shape).

    `absmax` is fp32, broadcastable to `elem_idx` (one value per element's block).
    `code_ptr` points at the 16 fp32 NF4 values. Masked lanes return 0. Meant for fused
    kernels that dequantize weight tiles in registers; cast the result as needed.
    """
    byte = tl.load(packed_ptr + elem_idx // 2, mask=mask, other=0).to(tl.int32)
    # even elements live in the high nibble
    nibble = tl.where(elem_idx % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    return _mul_rn(value, absmax, NV_PTX)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                        out_ptr, n, blocksize: tl.constexpr, nested_blocksize: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, NV_PTX: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # blocksize and nested_blocksize are constexpr: only 8 powers of two are legal, so at
    # most 8 compiled variants, and `//` becomes a shift instead of a 64-bit division.
    # int64 from the start: pid * BLOCK_SIZE passes 2**31 for weights over 2G elements.
    pid = tl.program_id(0).to(tl.int64)
    elem_idx = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = elem_idx < n
    absmax = nf4_absmax_values(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, elem_idx // blocksize,
                               mask, nested_blocksize, DOUBLE_QUANT, NV_PTX)
    values = nf4_dequant_values(packed_ptr, code_ptr, absmax, elem_idx, mask, NV_PTX)
    tl.store(out_ptr + elem_idx, _cast_rn(values, out_ptr.dtype.element_ty, NV_PTX), mask=mask)


def nf4_dequantize_triton(weight: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `reference.nf4_dequantize` (same bits): `weight` in `dtype`.

    The output is allocated on the weight's device, or written into `out` (contiguous, of the
    weight's shape, `dtype`, on its device), which is returned: a caller that dequantizes the
    same shapes over and over keeps one buffer.
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; use one of {_OUT_DTYPES}")
    shape = tuple(weight.shape)
    device = weight.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, got "
                         f"{'a non-contiguous ' if not out.is_contiguous() else ''}{out.dtype} tensor of shape "
                         f"{list(out.shape)} on {out.device}")
    if weight.numel == 0:
        return out
    double_quant = weight.double_quant
    absmax = weight.absmax
    # unused pointers without double quant: any tensor on the device will do
    nested_absmax, nested_code, offset = (weight.nested_absmax, weight.nested_code, weight.offset) if double_quant \
        else (absmax, absmax, absmax)
    code = reference.nf4_code(device)
    blocksize, nested_blocksize, packed, n = weight.blocksize, weight.nested_blocksize, weight.packed, weight.numel

    nv_ptx = device.type == "cuda" and torch.version.hip is None and not _interpreting()
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _nf4_dequant_kernel[grid](
        packed, absmax, nested_absmax, nested_code, offset, code, out, n,
        blocksize=blocksize, nested_blocksize=nested_blocksize if double_quant else 1,
        DOUBLE_QUANT=double_quant, NV_PTX=nv_ptx, BLOCK_SIZE=BLOCK_SIZE,
        num_warps=4, enable_fp_fusion=False,
    )
    return out
