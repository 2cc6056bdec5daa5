"""NF4 storage: the plain-PyTorch meaning of the NF4 ops.

Every kernel (C++, CUDA, Triton) is tested against these functions, and they are the
fallback when a native backend is missing. They follow bitsandbytes' arithmetic step by
step (same fp32 operations, same tie rules), because bitsandbytes checkpoints are the
format we must read and write byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The 16 NF4 values (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1],
# sorted, index 7 is exactly 0. Stored as fp32, as bitsandbytes stores `quant_map`.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# Resolution of the table bitsandbytes' CPU backend uses to pick an 8-bit code: [-1, 1] is
# cut into this many bins and each bin maps to one code. It is not always the nearest code,
# but it is what bitsandbytes writes, so it is what we write.
DYNAMIC_LUT_SIZE = 65536


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def nf4_midpoints(device: torch.device | str | None = None) -> torch.Tensor:
    """Decision thresholds between consecutive NF4 values, in fp32."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic map used for double quant of absmax (256 sorted values).

    Dynamic exponent: for exponent e = 0..6 the positive half holds 2**e fraction steps,
    evenly spaced means of linspace(0.1, 1) scaled by 10**(e - 6), mirrored for negatives,
    plus 0 and 1, padded with zeros to 256 entries, sorted.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    values: list[float] = []
    for e in range(max_exponent_bits):
        steps = 2 ** (e + non_sign_bits - max_exponent_bits) + 1
        edges = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + e)
        # scaled in fp32, as the format's definition does (python-double products differ
        # in the last ulp)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """uint8[65536]: bin i of [-1, 1] -> index of the code bitsandbytes' CPU backend picks."""
    code = code.detach().float().cpu()
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(DYNAMIC_LUT_SIZE, dtype=torch.float32)
    centers = -1.0 + (2.0 * i) / float(DYNAMIC_LUT_SIZE - 1)
    # number of midpoints strictly below the bin's centre
    return torch.searchsorted(mids, centers, right=False).to(torch.uint8)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not allowed; use one of {ALLOWED_BLOCKSIZES}")


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def nf4_quantize_blocks(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the flattened `weight` to NF4.

    Returns `packed` (uint8, (n + 1) // 2 bytes, element 2i in the high nibble) and
    `absmax` (fp32, one per block of `blocksize` consecutive elements).
    Full blocks scale by `x * (1 / absmax)`, the last partial block by `x / absmax`
    (bitsandbytes does exactly this, and the two differ in the last ulp). A full block of
    zeros stores absmax 0, a partial one 1e-38 (bitsandbytes clamps only the tail); both
    give code 7 (the value 0). An odd count pads one 0 (code 7).
    """
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = torch.bucketize(scaled, nf4_midpoints(flat.device), right=False).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def nested_absmax(
    absmax_codes: torch.Tensor, nested_absmax_: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor,
    nested_blocksize: int,
) -> torch.Tensor:
    """fp32 absmax of double quant: nested_code[q] * nested_absmax[block] + offset."""
    return dequantize_blockwise_8bit(absmax_codes, nested_absmax_, nested_code, nested_blocksize) + offset.float()


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax_: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """Inverse of `nf4_quantize_blocks`: NF4[code] * absmax in fp32, then cast to `dtype`.

    With double quant `absmax` holds uint8 codes and is first expanded by `nested_absmax`.
    """
    n = math.prod(shape)
    packed = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    if nested_absmax_ is not None:
        absmax = nested_absmax(absmax, nested_absmax_, nested_code, offset, nested_blocksize)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = nf4_code(packed.device)[codes]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)


def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a 256-entry `code` (the double-quant step).

    absmax per block; x * (1 / absmax) clamped to [-1, 1] is mapped to one of 65536 bins
    by trunc(((v + 1) * 0.5) * 65535 + 0.5) in fp32, and the bin to a code through
    `dynamic_lut`. A block of zeros gets absmax 0 and code 0 (bitsandbytes' CPU rule).
    """
    flat = A.reshape(-1).float()
    n = flat.numel()
    nb = _blocks(n, blocksize)
    padded = torch.cat([flat, flat.new_zeros(nb * blocksize - n)]).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1) if n else flat.new_empty(0)
    inv = 1.0 / absmax
    v = torch.clamp(padded * inv.unsqueeze(1), -1.0, 1.0)
    bins = (((v + 1.0) * 0.5) * float(DYNAMIC_LUT_SIZE - 1) + 0.5).to(torch.int64)
    bins = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(bins), bins)
    q = dynamic_lut(code).to(flat.device)[bins]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(A.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """code[q] * absmax[block], fp32."""
    flat = q.reshape(-1).long()
    scale = absmax.float().repeat_interleave(blocksize)[: flat.numel()]
    return (code.float()[flat] * scale).reshape(q.shape)
