"""Fused LoRA linear in Triton, forward and backward, dense or NF4 base weight.

Meaning: `qlora_kernels.reference.lora.lora_linear`,
y = x · Wᵀ + bias + scaling · (dropout(x) · lora_Aᵀ) · lora_Bᵀ, dropout on the LoRA branch only.

Kernels:

* `_lora_xa_kernel`: xa = dropout(x) · lora_Aᵀ, [M, r] in fp32 (kept for the backward's dB).
* `_lora_forward_kernel`: one program per (BLOCK_M, BLOCK_N) tile of y: scaling · xa · lora_Bᵀ,
  then x · Wᵀ over K with W tiles loaded dense or dequantized from NF4 in registers
  (`nf4_dequant.nf4_absmax_values` / `nf4_dequant_values`: the same bits as
  `reference.nf4_dequantize`, so W is never written to memory), + bias, one store.
* `_lora_dx_kernel`: one program per (BLOCK_M, BLOCK_K) tile of dx:
  keep / (1 - p) ⊙ (scaling · (dY · lora_B) · lora_A), then dY · W over N, W dequantized as above.
* `_lora_dA_kernel`: dA = scaling · (dY · lora_B)ᵀ · dropout(x), M split over programs with
  fp32 partial sums added by torch (deterministic, unlike atomics).
* `_lora_dx_lowrank_kernel`: keep / (1 - p) ⊙ (scaling · (dY · lora_B) · lora_A) alone, for the
  dequantize-once path, which adds dY · W through cuBLAS.
  dB, dY · lora_B and dbias are small rank-r GEMMs / reductions without dropout: torch.

Dropout: keep[m, k] = tl.rand(seed, m * K + k) >= p (Philox, 32-bit counter, so the mask
repeats only past 2**32 elements), dropped values scaled by 1 / (1 - p). Every kernel
regenerates the mask from the seed; it is never stored. `lora_dropout_keep` materializes it.

Numerics: fp32 accumulation everywhere; the output is rounded once, to nearest even, to x's
dtype. Tensor-core dots take operands in the compute dtype, so the rank-r intermediates
(xa, dY · lora_B) are rounded to it before their dot, as PEFT's own fp16/bf16 path rounds
them; `scaling` and 1 / (1 - p) multiply the fp32 accumulator. fp32 inputs use IEEE dots
unless TF32 is on for cuBLAS matmuls (`torch.backends.cuda.matmul.fp32_precision`, which
also reflects the legacy `allow_tf32` and `torch.set_float32_matmul_precision`), as
torch.matmul does.
Kernels launch with `enable_fp_fusion=False`, as `nf4_dequant` does. The dequant's products
are guarded by `_mul_rn` anyway; the flag fixes the epilogue's rounding to one choice across
Triton 3.6 (fuses by default) and later versions (moving to no fusion, 3.9 warns).
W element and absmax indices are int32 (W has < 2**31 elements: Llama's largest layer,
lm_head 128256 × 8192, has 1.05G); activation offsets are int64.

Interpreter (TRITON_INTERPRET=1): its `tl.dot` gives wrong numbers on bf16 inputs, so dot
operands are upcast to fp32 there (UPCAST_DOT); casts to bf16 go through
`_common._cast_rn`, which rounds to nearest even where the interpreter truncates;
one small tile config replaces autotuning.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qlora_kernels import reference
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.triton._common import _cast_rn, _interpreting
from qlora_kernels.triton.nf4_dequant import nf4_absmax_values, nf4_dequant_values

__all__ = ["lora_forward_triton", "lora_backward_triton", "lora_dropout_keep", "lora_xa_triton", "lora_dA_triton",
           "lora_dx_lowrank_triton"]

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETING = _interpreting()
_MAX_RANK = 256
# split-M partial sums for dA until about this many programs per SM are running
_DA_PROGRAMS_PER_SM = 2
# Tiles (BLOCK_M, output BLOCK_N or BLOCK_K, reduction BLOCK_K or BLOCK_N, num_stages,
# num_warps), keyed by the dots' input precision: None for fp16/bf16 operands, "tf32" and
# "ieee" for fp32 ones. W tiles span at most 64 along K so that with blocksize >= 64 (QLoRA
# uses 64) and K a multiple of it, each W row of a tile has one absmax: one absmax load per
# row instead of per element. With one absmax per element (a blocksize below the tile's K
# extent, or K not a multiple of the blocksize) the pipeliner stages every gathered operand
# in shared memory, up to 2.3 times the bytes, so which tiles fit the device depends on the
# compiled variant: `_fitting_configs` keeps those that do, and each table has one that fits
# sm_86's 101,376 bytes in every variant. No entry spills registers on sm_80 or sm_90
# wherever it fits, under Triton 3.6 and 3.9 (scripts/triton_static_report.py;
# tests/test_triton_compile.py checks all of this). The fused kernels serve fewer tokens than
# the dequantize-once path's threshold, hence mostly 64-row tiles; 8 warps, as 4-warp tiles
# of these sizes spill on sm_80. TF32 operands take twice the shared memory of fp16. IEEE
# fp32 dots run on FMA units and hold whole K slices of both operands in registers: narrow
# reduction steps, else they spill.
_FORWARD_TILES = {
    None: (
        (64, 128, 32, 4, 8),
        (128, 64, 32, 3, 8),
        (64, 64, 64, 3, 8),
        (64, 64, 32, 3, 8),
    ),
    "tf32": (
        (128, 64, 32, 3, 8),
        (64, 64, 32, 3, 8),
        (32, 64, 32, 3, 4),
    ),
    "ieee": (
        (64, 32, 16, 2, 8),
        (32, 32, 16, 2, 8),
    ),
}
# dx tiles are [BLOCK_M, BLOCK_K] with W's K extent = BLOCK_K, hence narrower outputs
_DX_TILES = {
    None: (
        (128, 64, 64, 3, 8),
        (64, 64, 128, 2, 8),
        (128, 64, 32, 3, 8),
        (64, 64, 32, 3, 8),
    ),
    "tf32": (
        (128, 64, 32, 3, 8),
        (64, 64, 64, 3, 8),
        (64, 64, 32, 3, 8),
        (32, 64, 32, 3, 4),
    ),
    "ieee": (
        (64, 32, 16, 2, 8),
        (32, 32, 16, 2, 8),
    ),
}
_INTERPRETER_TILE = (16, 32, 64, 1, 4)
# The autotuner adds the tensors' dtypes itself. Every constexpr the launcher derives from
# its arguments changes the compiled kernel, so each one is named: a key is tuned, and its
# tiles pruned against shared memory, for exactly one compiled variant.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "r", "W_NF4", "DOUBLE_QUANT", "blocksize", "nested_blocksize", "DOT_PRECISION"]


def _gemm_configs(tiles: dict, out_name: str, reduce_name: str) -> dict[str | None, list[triton.Config]]:
    """Configs per dot input precision."""
    def config(bm, out, red, stages, warps):
        return triton.Config({"BLOCK_M": bm, out_name: out, reduce_name: red}, num_stages=stages, num_warps=warps)

    if _INTERPRETING:
        # one small tile: with a single config the autotuner neither prunes nor benchmarks
        return {"interpreter": [config(*_INTERPRETER_TILE)]}
    return {precision: [config(*tile) for tile in precision_tiles] for precision, precision_tiles in tiles.items()}


def _every_config(configs: dict) -> list[triton.Config]:
    return [config for precision_configs in configs.values() for config in precision_configs]


_FORWARD_CONFIGS = _gemm_configs(_FORWARD_TILES, "BLOCK_N", "BLOCK_K")
_DX_CONFIGS = _gemm_configs(_DX_TILES, "BLOCK_K", "BLOCK_N")


def _fitting_configs(kernel, configs: dict, named_args: dict, kwargs: dict) -> list[triton.Config]:
    """`early_config_prune`: the configs of this launch's dot precision that fit the device's
    shared memory, per compiled variant (the autotuner key names every constexpr).

    The shared memory a tile needs depends on the variant (the absmax gathers above), so each
    candidate is compiled and its size read from the compiled kernel, the number Triton
    compares with the device's limit at launch. This costs nothing: the autotuner compiles
    every candidate anyway, and the benchmark then finds each in the kernel's cache.
    """
    launch = {name: value for name, value in kwargs.items() if name not in ("grid", "warmup")}
    active = triton.runtime.driver.active
    limit = active.utils.get_device_properties(active.get_current_device())["max_shared_mem"]
    fits = []
    for config in configs[launch["DOT_PRECISION"]]:
        compiled = kernel.fn.warmup(grid=(1,), **named_args, **launch, **config.all_kwargs())
        if compiled.metadata.shared <= limit:
            fits.append(config)
    if not fits:
        flags = {name: launch[name] for name in ("W_NF4", "blocksize", "K_ALIGNED", "DOUBLE_QUANT", "DOT_PRECISION")}
        raise RuntimeError(f"{kernel.fn.__name__}: no tile fits the device's {limit} bytes of shared memory "
                           f"for {flags}")
    return fits


@triton.jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dropout_keep(seed, rows, cols, K, dropout_p):
    """keep mask of dropout(x) at x[rows, cols] (broadcastable int32 index tensors)."""
    return tl.rand(seed, rows * K + cols) >= dropout_p


@triton.jit
def _weight_tile(w_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                 n_idx, k_idx, k0, N, K, DTYPE: tl.constexpr, W_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 blocksize: tl.constexpr, nested_blocksize: tl.constexpr, K_ALIGNED: tl.constexpr,
                 K_TILE: tl.constexpr, NV_PTX: tl.constexpr):
    """W[n_idx, k_idx] in DTYPE, 0 out of bounds; n_idx and k_idx broadcast to the tile's shape
    (so one helper serves the forward's Wᵀ tile and the backward's W tile). k_idx spans
    [k0, k0 + K_TILE)."""
    mask = (n_idx < N) & (k_idx < K)
    elem_idx = n_idx * K + k_idx
    if W_NF4:
        if K_ALIGNED and blocksize >= K_TILE:
            # rows start on a block boundary and the tile's K span fits in one block
            absmax = nf4_absmax_values(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                       (n_idx * K + k0) // blocksize, n_idx < N, nested_blocksize,
                                       DOUBLE_QUANT, NV_PTX)
        else:
            absmax = nf4_absmax_values(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                       elem_idx // blocksize, mask, nested_blocksize, DOUBLE_QUANT, NV_PTX)
        w = _cast_rn(nf4_dequant_values(packed_ptr, code_ptr, absmax, elem_idx, mask, NV_PTX), DTYPE, NV_PTX)
    else:
        w = tl.load(w_ptr + elem_idx, mask=mask, other=0.0)
    return w


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk the column tiles together, so their shared W tiles stay in L2
    group_size = GROUP_M * num_cols
    first_row = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_rows - first_row, GROUP_M)
    return first_row + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def _dropout_keep_kernel(keep_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, offs_m[:, None], offs_k[None, :], K, dropout_p)
    ptrs = keep_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _lora_xa_kernel(x_ptr, lora_A_ptr, xa_ptr, M, K, r, seed, dropout_p, dropout_scale,
                    DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x_mask = (offs_m[:, None] < M) & (k[None, :] < K)
        if DROPOUT:
            # dropped elements are simply not loaded
            x_mask = x_mask & _dropout_keep(seed, offs_m[:, None], k[None, :], K, dropout_p)
        x = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)
        a = tl.load(lora_A_ptr + offs_r[None, :] * K + k[:, None], mask=(offs_r[None, :] < r) & (k[:, None] < K),
                    other=0.0)
        acc = _dot(x, a, acc, UPCAST_DOT, DOT_PRECISION)
    if DROPOUT:
        acc = acc * dropout_scale
    tl.store(xa_ptr + offs_m[:, None].to(tl.int64) * r + offs_r[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < r))


@triton.autotune(configs=_every_config(_FORWARD_CONFIGS), key=_AUTOTUNE_KEY + ["HAS_BIAS"], prune_configs_by={
    "early_config_prune": lambda configs, named_args, **kwargs: _fitting_configs(
        _lora_forward_kernel, _FORWARD_CONFIGS, named_args, kwargs)})
@triton.jit
def _lora_forward_kernel(x_ptr, w_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         code_ptr, bias_ptr, xa_ptr, lora_B_ptr, y_ptr, M, N, K, r, scaling, M_BUCKET,
                         W_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, blocksize: tl.constexpr,
                         nested_blocksize: tl.constexpr, K_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NV_PTX: tl.constexpr,
                         BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M_BUCKET (next power of two of M) only keys the autotuner: tuning per exact M would
    # re-benchmark at every new sequence length.
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # LoRA branch first, so `scaling` can multiply the fp32 accumulator before W's terms join it
    offs_r = tl.arange(0, BLOCK_R)
    xa_rows = xa_ptr + offs_m[:, None].to(tl.int64) * r
    for r0 in range(0, r, BLOCK_R):
        rr = r0 + offs_r
        xa = tl.load(xa_rows + rr[None, :], mask=m_ok & (rr[None, :] < r), other=0.0)
        b = tl.load(lora_B_ptr + offs_n[None, :] * r + rr[:, None], mask=(offs_n[None, :] < N) & (rr[:, None] < r),
                    other=0.0)
        acc = _dot(_cast_rn(xa, DTYPE, NV_PTX), b, acc, UPCAST_DOT, DOT_PRECISION)
    acc = acc * scaling

    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
        w_t = _weight_tile(w_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                           offs_n[None, :], k[:, None], k0, N, K, DTYPE, W_NF4, DOUBLE_QUANT, blocksize,
                           nested_blocksize, K_ALIGNED, BLOCK_K, NV_PTX)
        acc = _dot(x, w_t, acc, UPCAST_DOT, DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], _cast_rn(acc, DTYPE, NV_PTX),
             mask=m_ok & (offs_n[None, :] < N))


@triton.autotune(configs=_every_config(_DX_CONFIGS), key=_AUTOTUNE_KEY + ["DROPOUT"], prune_configs_by={
    "early_config_prune": lambda configs, named_args, **kwargs: _fitting_configs(
        _lora_dx_kernel, _DX_CONFIGS, named_args, kwargs)})
@triton.jit
def _lora_dx_kernel(dy_ptr, w_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                    dyb_ptr, lora_A_ptr, dx_ptr, M, N, K, r, lora_scale, seed, dropout_p, M_BUCKET,
                    W_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, blocksize: tl.constexpr,
                    nested_blocksize: tl.constexpr, K_ALIGNED: tl.constexpr, DROPOUT: tl.constexpr,
                    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NV_PTX: tl.constexpr,
                    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # lora_scale = scaling / (1 - p); M_BUCKET only keys the autotuner (see the forward)
    DTYPE: tl.constexpr = dy_ptr.dtype.element_ty
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)

    # LoRA branch first: its dropout mask and scale apply to the accumulator before the
    # dY · W terms join it, so no second accumulator is needed
    offs_r = tl.arange(0, BLOCK_R)
    dyb_rows = dyb_ptr + offs_m[:, None].to(tl.int64) * r
    for r0 in range(0, r, BLOCK_R):
        rr = r0 + offs_r
        dyb = tl.load(dyb_rows + rr[None, :], mask=m_ok & (rr[None, :] < r), other=0.0)
        a = tl.load(lora_A_ptr + rr[:, None] * K + offs_k[None, :], mask=(rr[:, None] < r) & (offs_k[None, :] < K),
                    other=0.0)
        acc = _dot(dyb, a, acc, UPCAST_DOT, DOT_PRECISION)
    acc = acc * lora_scale
    if DROPOUT:
        acc = tl.where(_dropout_keep(seed, offs_m[:, None], offs_k[None, :], K, dropout_p), acc, 0.0)

    offs_n = tl.arange(0, BLOCK_N)
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * N
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        dy = tl.load(dy_rows + n[None, :], mask=m_ok & (n[None, :] < N), other=0.0)
        w = _weight_tile(w_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                         n[:, None], offs_k[None, :], k0, N, K, DTYPE, W_NF4, DOUBLE_QUANT, blocksize,
                         nested_blocksize, K_ALIGNED, BLOCK_K, NV_PTX)
        acc = _dot(dy, w, acc, UPCAST_DOT, DOT_PRECISION)

    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], _cast_rn(acc, DTYPE, NV_PTX),
             mask=m_ok & (offs_k[None, :] < K))


@triton.jit
def _lora_dA_kernel(dyb_ptr, x_ptr, partial_ptr, M, K, r, lora_scale, seed, dropout_p,
                    DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    # program (tile, split): the dA tile's sum over split's share of M, into partial[split]
    num_k = tl.cdiv(K, BLOCK_K)
    pid_r = tl.program_id(0) // num_k
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = (tl.program_id(0) % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    m_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(1)) * BLOCK_M
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + offs_m
        # (dY · lora_B)ᵀ tile: [BLOCK_R, BLOCK_M] read from the row-major [M, r] buffer
        dyb_t = tl.load(dyb_ptr + m[None, :].to(tl.int64) * r + offs_r[:, None],
                        mask=(m[None, :] < M) & (offs_r[:, None] < r), other=0.0)
        x_mask = (m[:, None] < M) & (offs_k[None, :] < K)
        if DROPOUT:
            x_mask = x_mask & _dropout_keep(seed, m[:, None], offs_k[None, :], K, dropout_p)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + offs_k[None, :], mask=x_mask, other=0.0)
        acc = _dot(dyb_t, x, acc, UPCAST_DOT, DOT_PRECISION)
    tl.store(partial_ptr + (split * r + offs_r[:, None]).to(tl.int64) * K + offs_k[None, :], acc * lora_scale,
             mask=(offs_r[:, None] < r) & (offs_k[None, :] < K))


@functools.lru_cache(maxsize=None)
def _nf4_code(device: torch.device) -> torch.Tensor:
    # cached: building it per call would be a host-to-device copy on every forward
    return reference.nf4_code(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # interpreter: a few "SMs", so small test shapes still take the split-M path of dA
    return 4


def _block_r(r: int) -> int:
    # tl.dot needs every dim >= 16; ranks above 64 loop over chunks of 64
    return max(16, min(64, triton.next_power_of_2(r)))


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")


def _launch_flags(x: torch.Tensor) -> dict:
    if x.dtype == torch.float32:
        # the per-backend setting, not `allow_tf32`: reading that raises once TF32 was set
        # through fp32_precision (as transformers' TrainingArguments(tf32=True) does)
        precision = "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"
    else:
        precision = None  # Triton's default; the option only concerns fp32 operands
    return dict(
        UPCAST_DOT=_INTERPRETING,
        DOT_PRECISION=precision,
        NV_PTX=x.device.type == "cuda" and torch.version.hip is None and not _INTERPRETING,
    )


def _weight_args(weight: torch.Tensor | None, nf4_state: NF4Weight | None, N: int, K: int,
                 x: torch.Tensor) -> dict:
    """The W kernel arguments, by name: pointers (unused ones point at any tensor) and flags."""
    if (weight is None) == (nf4_state is None):
        raise ValueError("pass exactly one of weight (dense) and nf4_state")
    if N * K >= 2**31:
        raise ValueError(f"W has {N * K} elements; the kernels index W in int32 (< 2**31)")
    device = x.device
    if weight is not None:
        if weight.shape != (N, K) or weight.dtype != x.dtype:
            raise ValueError(f"weight must be [{N}, {K}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
        weight = weight.contiguous()
        return dict(w_ptr=weight, packed_ptr=weight, absmax_ptr=weight, nested_absmax_ptr=weight,
                    nested_code_ptr=weight, offset_ptr=weight, code_ptr=weight, W_NF4=False, DOUBLE_QUANT=False,
                    blocksize=1, nested_blocksize=1, K_ALIGNED=False)

    s = nf4_state
    if tuple(s.shape) != (N, K):
        raise ValueError(f"nf4_state is {list(s.shape)}, the LoRA factors need [{N}, {K}]")
    if s.device != device:
        raise ValueError(f"nf4_state is on {s.device}, x on {device}")
    packed, absmax, double_quant = s.packed, s.absmax, s.double_quant
    # unused pointers without double quant: any tensor on the device will do
    nested_absmax, nested_code, offset = (s.nested_absmax, s.nested_code, s.offset) if double_quant \
        else (absmax, absmax, absmax)
    return dict(w_ptr=packed, packed_ptr=packed, absmax_ptr=absmax, nested_absmax_ptr=nested_absmax,
                nested_code_ptr=nested_code, offset_ptr=offset, code_ptr=_nf4_code(device), W_NF4=True,
                DOUBLE_QUANT=double_quant, blocksize=s.blocksize,
                nested_blocksize=s.nested_blocksize if double_quant else 1, K_ALIGNED=K % s.blocksize == 0)


def _check_lora(x2d: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[int, int, int, int]:
    if x2d.dim() != 2 or x2d.dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"x2d must be 2-D fp32/fp16/bf16, got {tuple(x2d.shape)} {x2d.dtype}")
    M, K = x2d.shape
    r = lora_A.shape[0]
    N = lora_B.shape[0]
    if not 1 <= r <= _MAX_RANK:
        raise ValueError(f"rank {r} outside 1..{_MAX_RANK}")
    if lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise ValueError(f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not fit x [{M}, {K}]")
    if lora_A.dtype != x2d.dtype or lora_B.dtype != x2d.dtype:
        raise ValueError("x2d, lora_A and lora_B must share one dtype")
    return M, N, K, r


def lora_dropout_keep(seed: int, p: float, M: int, K: int, device: torch.device | str) -> torch.Tensor:
    """bool [M, K]: the dropout keep mask the kernels draw for this seed and p (for tests)."""
    _check_dropout(p)
    keep = torch.empty((M, K), dtype=torch.uint8, device=device)
    if keep.numel():
        block_m, block_k = 32, 64
        _dropout_keep_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
            keep, M, K, int(seed), float(p), BLOCK_M=block_m, BLOCK_K=block_k, enable_fp_fusion=False)
    return keep.view(torch.bool)


def lora_forward_triton(
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    nf4_state: NF4Weight | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [M, N] in x2d's dtype, and xa = dropout(x) · lora_Aᵀ [M, r] fp32 for the backward.

    W is `weight` (dense [N, K], x2d's dtype) or `nf4_state` (exactly one of them).
    x2d, lora_A [r, K], lora_B [N, r] share one dtype (fp32/fp16/bf16); bias [N] any float
    dtype or None. `seed` (an int) draws the dropout mask; pass the same one to the backward.
    """
    M, N, K, r = _check_lora(x2d, lora_A, lora_B)
    _check_dropout(dropout_p)
    w_args = _weight_args(weight, nf4_state, N, K, x2d)
    device = x2d.device
    x2d, lora_A, lora_B = x2d.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    y = torch.empty((M, N), dtype=x2d.dtype, device=device)
    xa = lora_xa_triton(x2d, lora_A, dropout_p, seed)
    if M == 0:
        return y, xa
    flags = _launch_flags(x2d)
    block_r = _block_r(r)
    bias_arg = bias.contiguous() if bias is not None else y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _lora_forward_kernel[grid](
        x2d, **w_args, bias_ptr=bias_arg, xa_ptr=xa, lora_B_ptr=lora_B, y_ptr=y, M=M, N=N, K=K, r=r,
        scaling=float(scaling), M_BUCKET=triton.next_power_of_2(M), HAS_BIAS=bias is not None,
        BLOCK_R=block_r, GROUP_M=8, enable_fp_fusion=False, **flags,
    )
    return y, xa


def lora_backward_triton(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    nf4_state: NF4Weight | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    xa: torch.Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    needs_dbias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx [M, K], dA [r, K], dB [N, r], dbias [N]) in x2d's dtype, None where not needed.

    Arguments as for `lora_forward_triton`; dy2d [M, N] is the output's gradient, `xa` the
    forward's second result, `seed` and `dropout_p` the forward's. W gets no gradient.
    """
    M, N, K, r = _check_lora(x2d, lora_A, lora_B)
    _check_dropout(dropout_p)
    if dy2d.shape != (M, N):
        raise ValueError(f"dy2d must be [{M}, {N}], got {tuple(dy2d.shape)}")
    dtype = x2d.dtype
    device = x2d.device
    dy2d = dy2d.to(dtype).contiguous()
    dropout = dropout_p > 0
    lora_scale = float(scaling) / (1.0 - dropout_p)
    flags = _launch_flags(x2d)
    block_r = _block_r(r)
    dx = dA = dB = dbias = None

    # rank-r GEMMs without dropout, left to torch (cuBLAS): small next to dY · W
    dyb = dy2d @ lora_B if needs_dx or needs_dA else None
    if needs_dB:
        # scaling before the rounding to the compute dtype, as in the forward's xa · lora_Bᵀ
        dB = dy2d.t() @ (xa * scaling).to(dtype)
    if needs_dbias:
        dbias = dy2d.sum(0, dtype=torch.float32).to(dtype)

    if needs_dx:
        w_args = _weight_args(weight, nf4_state, N, K, x2d)
        dx = torch.empty((M, K), dtype=dtype, device=device)
        if M:
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

            _lora_dx_kernel[grid](
                dy2d, **w_args, dyb_ptr=dyb, lora_A_ptr=lora_A.contiguous(), dx_ptr=dx, M=M, N=N, K=K, r=r,
                lora_scale=lora_scale, seed=int(seed), dropout_p=float(dropout_p),
                M_BUCKET=triton.next_power_of_2(M), DROPOUT=dropout,
                BLOCK_R=block_r, GROUP_M=8, enable_fp_fusion=False, **flags,
            )

    if needs_dA:
        dA = lora_dA_triton(dyb, x2d, lora_scale, dropout_p, seed).to(dtype)
    return dx, dA, dB, dbias


# The rank-r terms on their own, for the dequantize-once path (backends/lora_dequant_mm.py),
# whose base product dY · W or x · Wᵀ goes to cuBLAS over a dequantized W. Same dropout
# draw, same roundings as the fused kernels above.

@triton.jit
def _lora_dx_lowrank_kernel(dyb_ptr, lora_A_ptr, dx_ptr, M, K, r, lora_scale, seed, dropout_p,
                            DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            NV_PTX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    # dx tile = keep ⊙ lora_scale · (dY · lora_B) · lora_A, the mask drawn again from the seed
    DTYPE: tl.constexpr = dx_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    dyb_rows = dyb_ptr + offs_m[:, None].to(tl.int64) * r
    for r0 in range(0, r, BLOCK_R):
        rr = r0 + offs_r
        dyb = tl.load(dyb_rows + rr[None, :], mask=m_ok & (rr[None, :] < r), other=0.0)
        a = tl.load(lora_A_ptr + rr[:, None] * K + offs_k[None, :], mask=(rr[:, None] < r) & (offs_k[None, :] < K),
                    other=0.0)
        acc = _dot(dyb, a, acc, UPCAST_DOT, DOT_PRECISION)
    acc = acc * lora_scale
    if DROPOUT:
        acc = tl.where(_dropout_keep(seed, offs_m[:, None], offs_k[None, :], K, dropout_p), acc, 0.0)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], _cast_rn(acc, DTYPE, NV_PTX),
             mask=m_ok & (offs_k[None, :] < K))


def _check_rank_operands(name: str, rows: torch.Tensor, lora_A: torch.Tensor) -> tuple[int, int, int]:
    """(M, K, r) of x2d [M, K] or dY · lora_B [M, r] against lora_A [r, K] (one dtype, one device)."""
    if rows.dim() != 2 or lora_A.dim() != 2 or rows.dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"{name} and lora_A must be 2-D fp32/fp16/bf16, got {name} {tuple(rows.shape)} "
                         f"{rows.dtype} and lora_A {tuple(lora_A.shape)}")
    if lora_A.dtype != rows.dtype or lora_A.device != rows.device:
        raise ValueError(f"lora_A ({lora_A.dtype}, {lora_A.device}) must share {name}'s dtype and device "
                         f"({rows.dtype}, {rows.device})")
    r, K = lora_A.shape
    if not 1 <= r <= _MAX_RANK:
        raise ValueError(f"rank {r} outside 1..{_MAX_RANK}")
    return rows.shape[0], K, r


def lora_xa_triton(x2d: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """xa = dropout(x2d) · lora_Aᵀ [M, r] in fp32, the mask the one every kernel here draws from `seed`."""
    _check_dropout(dropout_p)
    M, K, r = _check_rank_operands("x2d", x2d, lora_A)
    if x2d.shape[1] != K:
        raise ValueError(f"x2d has {x2d.shape[1]} features, lora_A {K}")
    xa = torch.empty((M, r), dtype=torch.float32, device=x2d.device)
    if M == 0:
        return xa
    flags = _launch_flags(x2d)
    block_r = _block_r(r)
    # fp32 dots hold whole K slices in registers: a narrower K step keeps them from spilling
    block_m, block_k = (16, 64) if _INTERPRETING else (32, 16 if x2d.dtype == torch.float32 else 64)
    _lora_xa_kernel[(triton.cdiv(M, block_m), triton.cdiv(r, block_r))](
        x2d.contiguous(), lora_A.contiguous(), xa, M, K, r, int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p),
        DROPOUT=dropout_p > 0, UPCAST_DOT=flags["UPCAST_DOT"], DOT_PRECISION=flags["DOT_PRECISION"],
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4, num_stages=4, enable_fp_fusion=False,
    )
    return xa


def lora_dA_triton(dyb: torch.Tensor, x2d: torch.Tensor, lora_scale: float, dropout_p: float,
                   seed: int) -> torch.Tensor:
    """dA = lora_scale · dybᵀ · (keep ⊙ x2d) [r, K] in fp32, dyb = dY · lora_B [M, r] in x2d's dtype,
    lora_scale = scaling / (1 - p). M is split over programs whose fp32 partial sums torch adds."""
    _check_dropout(dropout_p)
    M, K = x2d.shape
    r = dyb.shape[1]
    if dyb.shape[0] != M or dyb.dtype != x2d.dtype:
        raise ValueError(f"dyb must be [{M}, r] {x2d.dtype}, got {tuple(dyb.shape)} {dyb.dtype}")
    device = x2d.device
    flags = _launch_flags(x2d)
    block_r = _block_r(r)
    # fp32: half the M step (the dot's K), else IEEE dots spill on sm_80
    block_k, block_m = 64, (16 if _INTERPRETING else 32 if x2d.dtype == torch.float32 else 64)
    tiles = triton.cdiv(r, block_r) * triton.cdiv(K, block_k)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(_DA_PROGRAMS_PER_SM * _sm_count(device), tiles)))
    partial = torch.empty((splits, r, K), dtype=torch.float32, device=device)
    _lora_dA_kernel[(tiles, splits)](
        dyb.contiguous(), x2d.contiguous(), partial, M, K, r, float(lora_scale), int(seed), float(dropout_p),
        DROPOUT=dropout_p > 0, UPCAST_DOT=flags["UPCAST_DOT"], DOT_PRECISION=flags["DOT_PRECISION"],
        # 3 stages spill a few bytes at BLOCK_R 32 on sm_90
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=4, num_stages=4, enable_fp_fusion=False,
    )
    return partial.sum(0)


def lora_dx_lowrank_triton(dyb: torch.Tensor, lora_A: torch.Tensor, lora_scale: float, dropout_p: float, seed: int,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """keep ⊙ lora_scale · dyb · lora_A [M, K] in dyb's dtype (into `out` when given): the LoRA part of
    dx, dyb = dY · lora_B, lora_scale = scaling / (1 - p), the keep mask drawn again from `seed`.
    Accumulated in fp32, rounded once."""
    _check_dropout(dropout_p)
    M, K, r = _check_rank_operands("dyb", dyb, lora_A)
    if dyb.shape[1] != r:
        raise ValueError(f"dyb has {dyb.shape[1]} columns, lora_A {r} rows")
    if out is None:
        out = torch.empty((M, K), dtype=dyb.dtype, device=dyb.device)
    elif out.shape != (M, K) or out.dtype != dyb.dtype or out.device != dyb.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{M}, {K}] {dyb.dtype} tensor on {dyb.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    flags = _launch_flags(dyb)
    # memory-bound (one write of dx); the rank loop runs once for r <= 64. fp32 dots hold whole
    # rank slices in registers: smaller tiles, else they spill on sm_80
    block_m, block_k = (16, 64) if _INTERPRETING else (32, 64) if dyb.dtype == torch.float32 else (64, 128)
    _lora_dx_lowrank_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
        dyb.contiguous(), lora_A.contiguous(), out, M, K, r, float(lora_scale), int(seed), float(dropout_p),
        DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(r), num_warps=4, num_stages=2,
        enable_fp_fusion=False, **flags,
    )
    return out
