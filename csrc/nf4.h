// Native NF4 entry points. No torch headers: callers pass raw pointers, element counts, a
// dtype tag and (CUDA) a stream handle, so the module works with any torch version.
//
// Semantics are those of python/qlora_kernels/reference/nf4.py, bit for bit.
#pragma once

#include <cstdint>

namespace qk {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// Double-quant state of absmax: absmax[b] = nested_code[absmax_q[b]] *
// nested_absmax[b / nested_blocksize] + *offset, all fp32, no fused multiply-add.
struct NestedAbsmax {
    const uint8_t* absmax_q = nullptr;
    const float* nested_absmax = nullptr;
    const float* nested_code = nullptr;  // 256 values
    const float* offset = nullptr;       // one value
    int64_t nested_blocksize = 256;
};

// ---- CPU (csrc/nf4_cpu.cpp), multithreaded over blocks ----

// packed: (n + 1) / 2 bytes; absmax: ceil(n / blocksize) floats.
void nf4_quantize_cpu(const void* A, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                      int num_threads);

// absmax is used when nested.absmax_q is null, else the nested state.
void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, int64_t n,
                        int64_t blocksize, void* out, DType dtype, int num_threads);

// 8-bit blockwise quantization of fp32 values through a 65536-bin table `lut`
// (reference.dynamic_lut). out: n bytes; absmax: ceil(n / blocksize) floats.
void quantize_blockwise_8bit_cpu(const float* A, const uint8_t* lut, int64_t n, int64_t blocksize, uint8_t* out,
                                 float* absmax, int num_threads);

// ---- CUDA (kernels/nf4.cu); all pointers are device pointers, stream is a cudaStream_t ----
#ifdef QK_WITH_CUDA
void nf4_quantize_cuda(const void* A, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                       uintptr_t stream);
void nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, int64_t n,
                         int64_t blocksize, void* out, DType dtype, uintptr_t stream);
void quantize_blockwise_8bit_cuda(const float* A, const uint8_t* lut, int64_t n, int64_t blocksize, uint8_t* out,
                                  float* absmax, uintptr_t stream);
// Number of visible devices, or -1 with `error` filled when the runtime cannot answer.
int cuda_device_count(const char** error);
#endif

}  // namespace qk
