"""CUDA: the CUDA C++ kernels of kernels/ through qlora_kernels._C when they were
compiled; otherwise the Triton dequantize kernel (a build without nvcc still gets a fast
GPU dequantize) and the reference for the rest. Triton is a GPU requirement (the `gpu`
extra), so without it a CUDA dequantize raises ImportError naming it.

LoRA linear by tokens M: the CUDA GEMV for decode (M <= 16), the fused Triton kernels for
small M, dequantize-once + cuBLAS (lora_dequant_mm.py) from LORA_DEQUANT_ONCE_MIN_TOKENS.
The NF4 linear (NF4Linear's op) by M: the GEMV at rank 0 (M <= 16), else dequantize-once +
cuBLAS, whose dequantize is Triton where the CUDA C++ kernels are not usable.
Every kernel runs with its inputs' device current (`cuda_kernel`)."""

from __future__ import annotations

import functools
import math

import torch

from .._native import has_cuda_kernels, native
from ..nf4_weight import NF4Weight
from ..ops import attention as attention_ops
from ..ops import lora as lora_ops
from ..ops import nf4 as ops
from ..ops import nf4_linear as nf4_linear_ops
from .common import DTYPE_TAGS, dtype_tag, dynamic_lut, kernel
from .lora_dequant_mm import (
    lora_backward_dequant_mm,
    lora_forward_dequant_mm,
    nf4_dequantize_into,
    nf4_linear_dequant_mm,
    nf4_linear_dx_dequant_mm,
)

_C = native()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def on_input_device(fn):
    """`fn` run with its first tensor argument's device as the current CUDA device.

    Triton launches on the current device, and the C++ kernels and `torch.cuda.current_stream()`
    default to it: with layers on several GPUs (`device_map="auto"`) a kernel would otherwise run
    on whichever device is current, with another device's pointers. CPU tensors (the Triton
    interpreter) run `fn` as it is."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)
    return run


def cuda_kernel(op, implementation: str):
    """Register the decorated function as `op`'s CUDA kernel, run on its inputs' device
    (`on_input_device`); every kernel of this backend is registered through here."""
    def register(fn):
        return kernel(op, "cuda", implementation)(on_input_device(fn))
    return register


if has_cuda_kernels():

    @cuda_kernel(ops.nf4_quantize_blocks, "CUDA")
    def _(weight: torch.Tensor, blocksize: int):
        ops.check_quantize_args(weight, blocksize)
        weight = weight.contiguous()
        n = weight.numel()
        packed = torch.empty(((n + 1) // 2,), dtype=torch.uint8, device=weight.device)
        absmax = torch.empty((math.ceil(n / blocksize),), dtype=torch.float32, device=weight.device)
        _C.nf4_quantize_cuda(
            weight.data_ptr(), dtype_tag(weight.dtype), n, blocksize, packed.data_ptr(), absmax.data_ptr(),
            _stream(weight.device),
        )
        return packed, absmax

    @cuda_kernel(ops.quantize_blockwise_8bit, "CUDA")
    def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
        ops.check_quantize_8bit_args(A, code, blocksize)
        A = A.contiguous()
        out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        absmax = torch.empty((math.ceil(A.numel() / blocksize),), dtype=torch.float32, device=A.device)
        _C.quantize_blockwise_8bit_cuda(
            A.data_ptr(), dynamic_lut(code).data_ptr(), A.numel(), blocksize, out.data_ptr(), absmax.data_ptr(),
            _stream(A.device),
        )
        return out, absmax


@cuda_kernel(ops.nf4_dequantize, "CUDA" if has_cuda_kernels() else "Triton")
def cuda_nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype):
    w = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                               dtype)
    return nf4_dequantize_into(w, packed.new_empty(tuple(shape), dtype=dtype))


@cuda_kernel(ops.nf4_dequantize_out, "CUDA" if has_cuda_kernels() else "Triton")
def cuda_nf4_dequantize_out(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                            out):
    nf4_dequantize_into(ops.dequantize_out_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                                  nested_blocksize, shape, out), out)


# Triton kernels are imported on first use: `import qlora_kernels` stays free of triton's
# start-up cost, and a machine without triton only fails when it runs a CUDA op.

# Below this many queries against at least DECODE_MIN_KEYS keys, the keys are split across
# programs (flash-decoding): one query row alone cannot fill the GPU.
DECODE_MAX_QUERIES = 16
DECODE_MIN_KEYS = 256


@cuda_kernel(attention_ops.flash_attention_fwd, "Triton")
def triton_flash_attention_fwd(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen,
                               cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, sinks):
    args = (q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
            max_seqlen_k, window_left, window_right, softcap, sinks)
    attention_ops.check_args(*args)
    # the decode kernel implements every feature of a causal call (window, softcap, sinks, packed caches)
    if causal and (q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] >= DECODE_MIN_KEYS if cu_seqlens is None
                   else max_seqlen <= DECODE_MAX_QUERIES and max_seqlen_k >= DECODE_MIN_KEYS):
        from ..triton.flash_decode import flash_decode_triton

        return flash_decode_triton(q, k, v, softmax_scale, alibi_slopes, key_padding_mask, window_left, window_right,
                                   softcap, sinks, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    from ..triton.flash_attention import flash_attention_fwd_triton

    return flash_attention_fwd_triton(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens,
                                      max_seqlen or None, cu_seqlens_k, max_seqlen_k or None, window_left,
                                      window_right, softcap, sinks)


@cuda_kernel(attention_ops.flash_attention_bwd, "Triton")
def triton_flash_attention_bwd(dout, dlse, q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask,
                               cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap,
                               sinks):
    args = (causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k,
            window_left, window_right, softcap, sinks)
    attention_ops.check_backward_args(dout, dlse, q, out, lse, k, v, *args)
    from ..triton.flash_attention import flash_attention_bwd_triton

    *grads, dsinks = flash_attention_bwd_triton(dout, q, k, v, out, lse, causal, softmax_scale, alibi_slopes,
                                                key_padding_mask, cu_seqlens, max_seqlen or None, cu_seqlens_k,
                                                max_seqlen_k or None, window_left, window_right, softcap, sinks, dlse)
    return (*attention_ops.grads_like_inputs((q, k, v), grads), attention_ops.no_sinks_grad(q) if dsinks is None
            else dsinks)


def lora_gemv_cuda(x, state: NF4Weight, bias, xa, lora_B, scaling):
    """Decode (M <= _C.lora_gemv_max_rows): y = x·Wᵀ + bias + scaling·xa·Bᵀ reading the packed W once;
    xa and lora_B None: rank 0, the plain NF4 linear.

    The kernel reads x, bias and lora_B as x's dtype and xa as fp32: each is converted here, and
    every converted copy stays bound to a name until the launch is enqueued (a temporary freed
    before it could be reused by the allocator, or returned to the driver with caching off)."""
    if x.dim() != 2 or x.dtype not in DTYPE_TAGS:
        raise ValueError(f"x must be 2-D fp32/fp16/bf16, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    N = state.shape[0]
    if state.shape[1] != K:
        raise ValueError(f"the NF4 weight is {list(state.shape)}, x has {K} features")
    if (xa is None) != (lora_B is None):
        raise ValueError("pass both xa and lora_B (rank r) or neither (rank 0)")
    r = 0 if lora_B is None else lora_B.shape[-1]
    if r and (lora_B.shape != (N, r) or xa.shape != (M, r)):
        raise ValueError(f"lora_B must be [{N}, r] and xa [{M}, r], got {tuple(lora_B.shape)} and {tuple(xa.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    x = x.contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    lora_B = None if lora_B is None else lora_B.to(x.dtype).contiguous()
    xa = None if xa is None else xa.float().contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _C.lora_gemv_nf4_cuda(
        x.data_ptr(), dtype_tag(x.dtype), M, K, *state.native_pointers(), state.nested_blocksize, state.blocksize, N,
        0 if bias is None else bias.data_ptr(), 0 if xa is None else xa.data_ptr(),
        0 if lora_B is None else lora_B.data_ptr(), r, float(scaling), y.data_ptr(), _stream(x.device),
    )
    return y


# Tokens (rows of x) from which the LoRA forward and backward dequantize an NF4 W once into a
# workspace and hand the base product to cuBLAS (backends/lora_dequant_mm.py) instead of the
# fused Triton kernel. Compiled, the fused NF4 forward runs about 892 instructions per K-step
# around 4 tensor-core instructions (Triton 3.9; 1,861 on 3.6) and dequantizes W again for
# every tile of 128 rows: tensor-core use is capped near 29% (3.9) and 14% (3.6) of peak,
# where cuBLAS reaches about 70%. Per element of W on an H100 (989 TFLOP/s bf16, 3.35 TB/s,
# ~70% of either reached): dequantize-once costs one pass over W (0.5 byte read, 2 written,
# ~1.1 ps) plus a GEMM that is memory-bound on the 2-byte W below ~300 tokens (~0.85 ps) and
# takes 2·M flops at ~700 TFLOP/s above; the fused kernel, compute-bound from a few tens of
# tokens, takes 2·M flops at ~290 (3.9) or ~140 (3.6) TFLOP/s. Every term scales with N·K, so
# the crossing is a token count whatever the layer's shape: about 280 (3.9) and 135 (3.6).
# Left out of the estimate: the dequantize path's extra launches and its extra pass over y,
# which weigh most at a few hundred tokens. 512 is about twice the crossing, where the
# estimate has dequantize-once 1.4x (3.9) to 2.9x (3.6) faster; training steps (batch x
# sequence in the thousands: 2.2x to 4.6x at 4096 tokens) take it, decode and short prompts
# keep the fused kernel and need no workspace. To be set from `qlora-kernels bench lora`,
# whose NF4 rows from 128 to 2048 tokens time both paths, on the first GPU run.
LORA_DEQUANT_ONCE_MIN_TOKENS = 512


def _gemv_applies(x, state, dropout_p) -> bool:
    # the GEMV needs 16-byte aligned packed bytes; dropout (training) takes the Triton path
    return (state is not None and x.is_cuda and has_cuda_kernels() and dropout_p == 0.0
            and 1 <= x.shape[0] <= _C.lora_gemv_max_rows
            and state.packed.data_ptr() % 16 == 0)


@cuda_kernel(nf4_linear_ops.nf4_linear, "CUDA GEMV (M <= 16), dequantize-once + cuBLAS" if has_cuda_kernels()
             else "Triton dequantize-once + cuBLAS")
def cuda_nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
                    bias):
    state = nf4_linear_ops.nf4_weight(x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                      nested_blocksize, out_features, x.shape[1])
    if _gemv_applies(x, state, 0.0):
        return lora_gemv_cuda(x, state, bias, None, None, 0.0)
    return nf4_linear_dequant_mm(x, state, bias)


@on_input_device
def direct_nf4_linear(x, weight: NF4Weight, bias):
    """NF4Linear's inference path without the op's dispatch (ops/nf4_linear.direct_inference):
    the GEMV where `cuda_nf4_linear` would take it, else None (the op runs)."""
    return lora_gemv_cuda(x, weight, bias, None, None, 0.0) if _gemv_applies(x, weight, 0.0) else None


nf4_linear_ops.DIRECT_INFERENCE["cuda"] = direct_nf4_linear


@cuda_kernel(nf4_linear_ops.nf4_linear_bwd, "dequantize-once + cuBLAS" if has_cuda_kernels()
             else "Triton dequantize-once + cuBLAS")
def cuda_nf4_linear_bwd(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                        in_features):
    state = nf4_linear_ops.nf4_weight(dy, None, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                      nested_blocksize, dy.shape[1], in_features)
    return nf4_linear_dx_dequant_mm(dy, state)


def _dequant_once_applies(x, weight) -> bool:
    # fp32 always: the fused kernels' IEEE fp32 dots run on FMA units with narrow tiles (a correctness
    # path, not a fast one), where cuBLAS honours the TF32 setting and runs at full speed. A dense W
    # stored transposed (a Conv1D's [in, out]) too: cuBLAS reads it in place, the fused kernels
    # read W row-major and would copy it at every call
    return (x.dtype == torch.float32 or x.shape[0] >= LORA_DEQUANT_ONCE_MIN_TOKENS
            or (weight is not None and not weight.is_contiguous()))


@cuda_kernel(lora_ops.lora_linear_fwd, "CUDA GEMV (M <= 16), Triton fused, dequantize-once + cuBLAS (large M)")
def triton_lora_linear_fwd(x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                           nested_blocksize, out_features, bias, lora_A, lora_B, scaling, dropout_p, seed):
    if dropout_p > 0 and x.is_cuda and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        # `seed` was drawn on the host before this launch: a captured graph would replay one mask.
        # lora_linear refuses first; this also covers a graph captured around the op itself
        # (torch.compile's CUDA graphs, a direct op call).
        raise RuntimeError(f"lora_linear_fwd: dropout (dropout_p={dropout_p}) cannot be captured in a CUDA graph: "
                           "every replay would reuse the dropout mask of the seed drawn at capture")
    state = lora_ops.nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                              nested_blocksize, out_features, x.shape[1], x.dtype)
    if _gemv_applies(x, state, dropout_p):
        xa = x.float() @ lora_A.float().t()
        return lora_gemv_cuda(x, state, bias, xa, lora_B, scaling), xa
    if _dequant_once_applies(x, weight):
        return lora_forward_dequant_mm(x, weight, state, bias, lora_A, lora_B, scaling, dropout_p, int(seed))
    from ..triton.lora import lora_forward_triton

    return lora_forward_triton(x, weight, state, bias, lora_A, lora_B, scaling, dropout_p, int(seed))


@cuda_kernel(lora_ops.lora_linear_bwd, "Triton fused, dequantize-once + cuBLAS (large M)")
def triton_lora_linear_bwd(dy, x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                           nested_blocksize, lora_A, lora_B, scaling, dropout_p, seed, xa):
    state = lora_ops.nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                              nested_blocksize, dy.shape[1], x.shape[1], x.dtype)
    if _dequant_once_applies(x, weight):
        dx, dA, dB, dbias = lora_backward_dequant_mm(dy, x, weight, state, lora_A, lora_B, scaling, dropout_p,
                                                     int(seed), xa)
    else:
        from ..triton.lora import lora_backward_triton

        dx, dA, dB, dbias = lora_backward_triton(dy, x, weight, state, lora_A, lora_B, scaling, dropout_p, int(seed),
                                                 xa, True, True, True, True)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dbias.to(dy.dtype)
