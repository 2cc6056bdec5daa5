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

}  // namespace qk
