// Host and device helpers shared by the CUDA kernels of kernels/: stream and launch checks,
// integer helpers, the dtype dispatch and fp32 <-> storage conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nf4.h"

namespace qk {

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Every launch is followed by this: a bad configuration must raise, not leave garbage.
inline void check_launch(const char* kernel) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(kernel) + " launch failed: " + cudaGetErrorString(err));
}

// log2(value) for a positive power of two, else -1.
inline int exact_log2(int64_t value) {
    if (value <= 0 || (value & (value - 1)) != 0) return -1;
    int shift = 0;
    while ((int64_t{1} << shift) < value) ++shift;
    return shift;
}

// Calls f with a null T* for the element type named by dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
    switch (dtype) {
        case DType::F32:
            f(static_cast<float*>(nullptr));
            return;
        case DType::F16:
            f(static_cast<__half*>(nullptr));
            return;
        case DType::BF16:
            f(static_cast<__nv_bfloat16*>(nullptr));
            return;
    }
    throw std::invalid_argument("unknown dtype tag " + std::to_string(static_cast<int>(dtype)));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as torch's .to() does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Where a kernel finds a block's absmax: fp32 values, or with double quant
// nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset, each step rounded on
// its own (explicit _rn intrinsics: nvcc must not fuse them into an FMA, bitsandbytes does not).
struct AbsmaxSource {
    const float* __restrict__ absmax;
    const uint8_t* __restrict__ absmax_q;  // non-null: double quant
    const float* __restrict__ nested_absmax;
    const float* __restrict__ nested_code;
    const float* __restrict__ offset;
    int64_t nested_blocksize;
    int nested_shift;  // log2(nested_blocksize), or -1 when it is not a power of two
};

// `offset` is *src.offset, loaded once per thread by the caller.
__device__ __forceinline__ float block_absmax(const AbsmaxSource& src, float offset, int64_t block) {
    if (src.absmax_q == nullptr) return __ldg(src.absmax + block);
    const int64_t nested_block = src.nested_shift >= 0 ? block >> src.nested_shift : block / src.nested_blocksize;
    const float code = __ldg(src.nested_code + __ldg(src.absmax_q + block));
    return __fadd_rn(__fmul_rn(code, __ldg(src.nested_absmax + nested_block)), offset);
}

}  // namespace qk
