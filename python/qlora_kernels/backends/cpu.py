"""CPU: the C++ kernels of csrc/ (multithreaded), through qlora_kernels._C."""

from __future__ import annotations

import math

import torch

from .._native import native
from ..nf4_weight import NF4Weight
from ..ops import attention as attention_ops
from ..ops import lora as lora_ops
from ..ops import nf4 as ops
from ..ops import nf4_linear as nf4_linear_ops
from .common import dtype_tag, dynamic_lut, kernel

_C = native()

if _C is not None:

    @kernel(ops.nf4_quantize_blocks, "cpu", "C++")
    def _(weight: torch.Tensor, blocksize: int):
        ops.check_quantize_args(weight, blocksize)
        weight = weight.contiguous()
        n = weight.numel()
        packed = torch.empty(((n + 1) // 2,), dtype=torch.uint8)
        absmax = torch.empty((math.ceil(n / blocksize),), dtype=torch.float32)
        _C.nf4_quantize_cpu(
            weight.data_ptr(), dtype_tag(weight.dtype), n, blocksize, packed.data_ptr(), absmax.data_ptr(),
            torch.get_num_threads(),
        )
        return packed, absmax

    def _dequantize_into(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
        _C.nf4_dequantize_cpu(*w.native_pointers(), w.nested_blocksize, out.numel(), w.blocksize, out.data_ptr(),
                              dtype_tag(out.dtype), torch.get_num_threads())
        return out

    @kernel(ops.nf4_dequantize, "cpu", "C++")
    def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype):
        w = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                   shape, dtype)
        return _dequantize_into(w, torch.empty(shape, dtype=dtype))

    @kernel(ops.nf4_dequantize_out, "cpu", "C++")
    def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, out):
        _dequantize_into(ops.dequantize_out_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                                   nested_blocksize, shape, out), out)

    @kernel(ops.quantize_blockwise_8bit, "cpu", "C++")
    def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
        ops.check_quantize_8bit_args(A, code, blocksize)
        A = A.contiguous()
        out = torch.empty(A.shape, dtype=torch.uint8)
        absmax = torch.empty((math.ceil(A.numel() / blocksize),), dtype=torch.float32)
        _C.quantize_blockwise_8bit_cpu(
            A.data_ptr(), dynamic_lut(code).data_ptr(), A.numel(), blocksize, out.data_ptr(), absmax.data_ptr(),
            torch.get_num_threads(),
        )
        return out, absmax


    @kernel(attention_ops.flash_attention_fwd, "cpu", "C++")
    def _(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
          max_seqlen_k, window_left, window_right, softcap, sinks):
        from .attention_cpu import flash_attention_fwd_cpu

        args = (q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
                max_seqlen_k, window_left, window_right, softcap, sinks)
        attention_ops.check_args(*args)
        return flash_attention_fwd_cpu(*args)

    @kernel(attention_ops.flash_attention_bwd, "cpu", "C++")
    def _(dout, dlse, q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen,
          cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, sinks):
        from .attention_cpu import flash_attention_bwd_cpu

        args = (causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
                max_seqlen_k, window_left, window_right, softcap, sinks)
        attention_ops.check_backward_args(dout, dlse, q, out, lse, k, v, *args)
        dq, dk, dv, dsinks = flash_attention_bwd_cpu(dout, dlse, q, k, v, out, lse, *args)
        return (*attention_ops.grads_like_inputs((q, k, v), (dq, dk, dv)),
                attention_ops.no_sinks_grad(q) if dsinks is None else dsinks)


    def gemv_applies(M: int) -> bool:
        """Whether M tokens go to the NF4 GEMV (decode, short prompts): it reads each packed
        byte once, where the tiled path writes W out in tiles and reads them back."""
        return 1 <= M <= _C.lora_gemv_max_rows

    def _gemv(x, state, bias, xa, lora_B, scaling):
        from .lora_gemv_cpu import lora_gemv_cpu

        return lora_gemv_cpu(x, state, bias, xa, lora_B, scaling)

    @kernel(nf4_linear_ops.nf4_linear, "cpu", "C++ NF4 GEMV (M <= 16), NF4 tiles + torch GEMMs")
    def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, bias):
        from .lora_cpu import nf4_linear_cpu

        state = nf4_linear_ops.nf4_weight(x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                          nested_blocksize, out_features, x.shape[1])
        if gemv_applies(x.shape[0]):
            return _gemv(x, state, bias, None, None, 0.0)
        return nf4_linear_cpu(x, state, bias)

    def _direct_nf4_linear(x, weight, bias):
        return _gemv(x, weight, bias, None, None, 0.0) if gemv_applies(x.shape[0]) else None

    nf4_linear_ops.DIRECT_INFERENCE["cpu"] = _direct_nf4_linear

    @kernel(nf4_linear_ops.nf4_linear_bwd, "cpu", "C++ NF4 tiles + torch GEMMs")
    def _(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, in_features):
        from .lora_cpu import nf4_linear_dx_cpu

        state = nf4_linear_ops.nf4_weight(dy, None, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                          nested_blocksize, dy.shape[1], in_features)
        return nf4_linear_dx_cpu(dy, state)

    @kernel(lora_ops.lora_linear_fwd, "cpu", "C++ NF4 GEMV (M <= 16, no dropout), NF4 tiles + torch GEMMs")
    def _(x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
          bias, lora_A, lora_B, scaling, dropout_p, seed):
        from .lora_cpu import dropout_keep_mask_cpu, lora_forward_cpu

        M, K = x.shape
        state = lora_ops.nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                  nested_blocksize, out_features, K, x.dtype)
        if state is not None and dropout_p == 0 and gemv_applies(M):
            xa = x.float() @ lora_A.float().t()
            return _gemv(x, state, bias, xa, lora_B, scaling), xa
        keep = dropout_keep_mask_cpu(int(seed), dropout_p, M, K) if dropout_p > 0 else None
        y, xa = lora_forward_cpu(x, weight, state, bias, lora_A, lora_B, scaling, keep, dropout_p)
        return y, xa.float()

    @kernel(lora_ops.lora_linear_bwd, "cpu", "C++ NF4 tiles + torch GEMMs")
    def _(dy, x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, lora_A,
          lora_B, scaling, dropout_p, seed, xa):
        from .lora_cpu import dropout_keep_mask_cpu, lora_backward_cpu

        M, K = x.shape
        state = lora_ops.nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                  nested_blocksize, dy.shape[1], K, x.dtype)
        keep = dropout_keep_mask_cpu(int(seed), dropout_p, M, K) if dropout_p > 0 else None
        dx, dA, dB, dbias = lora_backward_cpu(dy, x, weight, state, lora_A, lora_B, scaling, keep, dropout_p,
                                              xa.to(x.dtype))
        return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dbias.to(dy.dtype)
