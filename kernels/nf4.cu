// CUDA NF4 kernels: blockwise NF4 quantize / dequantize and the 8-bit blockwise quantize of
// double quant. Semantics are python/qlora_kernels/reference/nf4.py bit for bit, so every fp32
// operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __frcp_rn):
// nvcc may not contract them into FMAs, and bitsandbytes rounds each step on its own.
//
// Assumes the default denormal handling (no -ftz / --use_fast_math): the partial-block clamp
// 1e-38 is subnormal, and bitsandbytes' results depend on it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"
#include "nf4.h"
#include "nf4_codebook.h"

namespace qk {
namespace {

__constant__ float kNF4[kNF4Codes] = QK_NF4_VALUES;

// bitsandbytes clamps the absmax of the last partial block to this before dividing.
constexpr float kMinAbsmax = 1e-38f;

constexpr int kThreads = 256;
// Loads each dequantize thread issues before the first use, to keep enough bytes in flight.
constexpr int kDequantUnroll = 4;
// Grid-stride loops let any n run under this grid size (far below CUDA's 2^31 - 1 limit).
constexpr int64_t kMaxGrid = int64_t{1} << 20;

// max |x| that propagates NaN (fmaxf drops it), as torch.amax does: a block holding a NaN
// gets a NaN absmax, which is how callers detect and refuse such a weight.
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

unsigned grid_for(int64_t work_items) {
    return static_cast<unsigned>(std::max<int64_t>(1, std::min(work_items, kMaxGrid)));
}

// Block indices are shifts, never divisions, on the hot path.
int log2_blocksize(int64_t blocksize) {
    const int shift = exact_log2(blocksize);
    if (shift < 5 || shift > 12)
        throw std::invalid_argument("NF4 blocksize must be a power of two in 32..4096, got " +
                                    std::to_string(blocksize));
    return shift;
}

template <typename Pair>
__device__ __forceinline__ uint32_t bits_of(Pair pair) {
    static_assert(sizeof(Pair) == 4, "a pair of 16-bit values");
    uint32_t bits;
    memcpy(&bits, &pair, 4);
    return bits;
}

// One 16-byte store of consecutive outputs (the pointer is 16-byte aligned).
__device__ __forceinline__ void store16(float* dst, const float (&v)[4]) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store16(__half* dst, const float (&v)[8]) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(bits_of(__floats2half2_rn(v[0], v[1])), bits_of(__floats2half2_rn(v[2], v[3])),
                   bits_of(__floats2half2_rn(v[4], v[5])), bits_of(__floats2half2_rn(v[6], v[7])));
}
__device__ __forceinline__ void store16(__nv_bfloat16* dst, const float (&v)[8]) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(bits_of(__floats2bfloat162_rn(v[0], v[1])), bits_of(__floats2bfloat162_rn(v[2], v[3])),
                   bits_of(__floats2bfloat162_rn(v[4], v[5])), bits_of(__floats2bfloat162_rn(v[6], v[7])));
}

// ---------------------------------------------------------------------------------------
// NF4 quantize
// ---------------------------------------------------------------------------------------

// BLOCKSIZE is a template parameter so each thread keeps its elements of a block in
// registers between the absmax reduction and the encoding (compile-time indices only).
// A group of min(BLOCKSIZE, 256) threads, always whole warps, owns one quant block.
template <typename T, int BLOCKSIZE>
__global__ void __launch_bounds__(kThreads)
    nf4_quantize_kernel(const T* __restrict__ A, int64_t n, uint8_t* __restrict__ packed, float* __restrict__ absmax) {
    constexpr int kGroup = BLOCKSIZE < kThreads ? BLOCKSIZE : kThreads;
    constexpr int kPerThread = BLOCKSIZE / kGroup;
    constexpr int kBlocksPerCta = kThreads / kGroup;
    constexpr int kWarpsPerGroup = kGroup / 32;
    static_assert(kGroup % 32 == 0, "groups are whole warps, so the pair and max shuffles stay inside one");

    __shared__ float warp_absmax[kThreads / 32];

    float midpoints[kNF4Codes - 1];
#pragma unroll
    for (int i = 0; i < kNF4Codes - 1; ++i) midpoints[i] = __fmul_rn(__fadd_rn(kNF4[i], kNF4[i + 1]), 0.5f);

    const int group = threadIdx.x / kGroup;
    const int rank = threadIdx.x % kGroup;
    const int warp = threadIdx.x / 32;
    const int64_t nblocks = ceil_div(n, BLOCKSIZE);
    const int64_t ntiles = ceil_div(nblocks, kBlocksPerCta);

    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int64_t block = tile * kBlocksPerCta + group;
        const int64_t start = block * BLOCKSIZE + rank;

        // Elements past n read as 0: they leave the absmax alone and encode as code 7,
        // which is exactly the padding of an odd n.
        float x[kPerThread];
        float local_absmax = 0.0f;
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
            const int64_t i = start + int64_t{k} * kGroup;
            x[k] = i < n ? to_float(A[i]) : 0.0f;
            local_absmax = nan_max(local_absmax, fabsf(x[k]));
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
            local_absmax = nan_max(local_absmax, __shfl_xor_sync(0xffffffffu, local_absmax, offset));
        float block_absmax = local_absmax;
        if constexpr (kWarpsPerGroup > 1) {
            if (threadIdx.x % 32 == 0) warp_absmax[warp] = local_absmax;
            __syncthreads();
            block_absmax = warp_absmax[group * kWarpsPerGroup];
#pragma unroll
            for (int w = 1; w < kWarpsPerGroup; ++w)
                block_absmax = nan_max(block_absmax, warp_absmax[group * kWarpsPerGroup + w]);
            // the next tile overwrites warp_absmax
            __syncthreads();
        }

        // bitsandbytes scales full blocks by a reciprocal but divides the partial last block,
        // and stores the clamped absmax only for that last block.
        const bool partial = (block + 1) * BLOCKSIZE > n;
        const float clamped = block_absmax != block_absmax ? block_absmax : fmaxf(block_absmax, kMinAbsmax);
        const float inv = __frcp_rn(clamped);
        if (rank == 0 && block < nblocks) absmax[block] = partial ? clamped : block_absmax;

#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
            const float scaled = partial ? __fdiv_rn(x[k], clamped) : __fmul_rn(x[k], inv);
            const float v = fminf(fmaxf(scaled, -1.0f), 1.0f);
            // Number of midpoints strictly below v: a value on a midpoint takes the lower code.
            uint32_t code = 0;
#pragma unroll
            for (int m = 0; m < kNF4Codes - 1; ++m) code += midpoints[m] < v ? 1u : 0u;
            // Element i and i ^ 1 sit in neighbouring lanes (kGroup and block starts are even).
            const uint32_t odd_code = __shfl_down_sync(0xffffffffu, code, 1);
            const int64_t i = start + int64_t{k} * kGroup;
            if (rank % 2 == 0 && i < n) packed[i >> 1] = static_cast<uint8_t>((code << 4) | odd_code);
        }
    }
}

// ---------------------------------------------------------------------------------------
// NF4 dequantize
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float load_offset(const AbsmaxSource& src) {
    return src.absmax_q == nullptr ? 0.0f : __ldg(src.offset);
}

__device__ __forceinline__ void load_nf4_table(float* table) {
    if (threadIdx.x < kNF4Codes) table[threadIdx.x] = kNF4[threadIdx.x];
    __syncthreads();
}

template <typename T>
__device__ __forceinline__ void dequantize_element(const uint8_t* __restrict__ packed, const AbsmaxSource& src,
                                                   float offset, const float* table, int64_t i, int log2_blocksize,
                                                   T* __restrict__ out) {
    const uint32_t byte = packed[i >> 1];
    const uint32_t code = (i & 1) == 0 ? byte >> 4 : byte & 0xFu;
    out[i] = from_float<T>(__fmul_rn(table[code], block_absmax(src, offset, i >> log2_blocksize)));
}

// Hot path. A "vector" is the 16 output bytes one thread stores at once (8 fp16/bf16 or
// 4 fp32 elements) and the 4 or 2 packed bytes it comes from. Thread t of a CTA takes vectors
// t, t + 256, ... of its tile, so every warp load reads 128 (64) contiguous bytes and every
// warp store writes 512 contiguous bytes: the stores carry 4-8x the traffic of the loads, so
// they are the ones kept fully coalesced. A vector's elements share one quant block (vectors
// are aligned and blocksize >= 32), so its absmax is fetched once.
// The table sits in shared memory: 16 floats hit 16 distinct banks, so lookups never conflict.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_vec_kernel(const uint8_t* __restrict__ packed, AbsmaxSource src, int64_t n, int log2_blocksize,
                              T* __restrict__ out) {
    constexpr int kPerVector = 16 / sizeof(T);
    constexpr int kBytes = kPerVector / 2;
    constexpr int64_t kTile = int64_t{kThreads} * kDequantUnroll;
    using Word = std::conditional_t<kBytes == 4, uint32_t, uint16_t>;

    __shared__ float table[kNF4Codes];
    load_nf4_table(table);
    const float offset = load_offset(src);

    const int64_t nvectors = n / kPerVector;
    const int64_t ntiles = ceil_div(nvectors, kTile);
    const Word* words = reinterpret_cast<const Word*>(packed);

    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int64_t first = tile * kTile + threadIdx.x;
        uint32_t word[kDequantUnroll];
        float scale[kDequantUnroll];
#pragma unroll
        for (int u = 0; u < kDequantUnroll; ++u) {
            const int64_t v = first + int64_t{u} * kThreads;
            if (v < nvectors) {
                word[u] = __ldg(words + v);
                scale[u] = block_absmax(src, offset, (v * kPerVector) >> log2_blocksize);
            }
        }
#pragma unroll
        for (int u = 0; u < kDequantUnroll; ++u) {
            const int64_t v = first + int64_t{u} * kThreads;
            if (v < nvectors) {
                // Byte b (lowest address first) holds element 2b in its high nibble.
                float values[kPerVector];
#pragma unroll
                for (int b = 0; b < kBytes; ++b) {
                    values[2 * b] = __fmul_rn(table[(word[u] >> (8 * b + 4)) & 0xFu], scale[u]);
                    values[2 * b + 1] = __fmul_rn(table[(word[u] >> (8 * b)) & 0xFu], scale[u]);
                }
                store16(out + v * kPerVector, values);
            }
        }
    }

    // The last n % kPerVector (< 8) elements, one per thread.
    if (blockIdx.x == 0) {
        const int64_t i = nvectors * kPerVector + threadIdx.x;
        if (i < n) dequantize_element(packed, src, offset, table, i, log2_blocksize, out);
    }
}

// Fallback for pointers the vector path cannot use (views at odd offsets): one element per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_scalar_kernel(const uint8_t* __restrict__ packed, AbsmaxSource src, int64_t n, int log2_blocksize,
                                 T* __restrict__ out) {
    __shared__ float table[kNF4Codes];
    load_nf4_table(table);
    const float offset = load_offset(src);
    for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
        dequantize_element(packed, src, offset, table, i, log2_blocksize, out);
}

// ---------------------------------------------------------------------------------------
// 8-bit blockwise quantize (double quant of absmax; small inputs), one CTA per quant block
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float cta_max(float value, float* scratch) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
    __syncthreads();
    float result = scratch[0];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) result = fmaxf(result, scratch[w]);
    // the next quant block overwrites scratch
    __syncthreads();
    return result;
}

__global__ void __launch_bounds__(kThreads)
    quantize_blockwise_8bit_kernel(const float* __restrict__ A, const uint8_t* __restrict__ lut, int64_t n,
                                   int64_t blocksize, uint8_t* __restrict__ out, float* __restrict__ absmax) {
    __shared__ float scratch[kThreads / 32];
    const int64_t nblocks = ceil_div(n, blocksize);
    for (int64_t block = blockIdx.x; block < nblocks; block += gridDim.x) {
        const int64_t begin = block * blocksize;
        const int64_t end = begin + blocksize < n ? begin + blocksize : n;

        float local_absmax = 0.0f;
        for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) local_absmax = fmaxf(local_absmax, fabsf(A[i]));
        const float block_absmax = cta_max(local_absmax, scratch);
        if (threadIdx.x == 0) absmax[block] = block_absmax;

        const float inv = __frcp_rn(block_absmax);
        for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
            uint8_t code = 0;  // bitsandbytes' CPU rule for an all-zero block
            if (block_absmax != 0.0f) {
                const float v = fminf(fmaxf(__fmul_rn(A[i], inv), -1.0f), 1.0f);
                const float position = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f);
                code = lut[__float2int_rz(position)];
            }
            out[i] = code;
        }
    }
}

}  // namespace

void nf4_quantize_cuda(const void* A, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                       uintptr_t stream) {
    if (n < 0) throw std::invalid_argument("nf4_quantize_cuda: n must be >= 0");
    const int blocksize_shift = log2_blocksize(blocksize);
    if (n == 0) return;
    dispatch_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const T* input = static_cast<const T*>(A);
        const auto launch = [&](auto blocksize_constant) {
            constexpr int kBlocksize = decltype(blocksize_constant)::value;
            constexpr int kBlocksPerCta = kBlocksize < kThreads ? kThreads / kBlocksize : 1;
            const int64_t ntiles = ceil_div(ceil_div(n, kBlocksize), kBlocksPerCta);
            nf4_quantize_kernel<T, kBlocksize>
                <<<grid_for(ntiles), kThreads, 0, as_stream(stream)>>>(input, n, packed, absmax);
            check_launch("nf4_quantize_kernel");
        };
        switch (blocksize_shift) {
            case 5: return launch(std::integral_constant<int, 32>{});
            case 6: return launch(std::integral_constant<int, 64>{});
            case 7: return launch(std::integral_constant<int, 128>{});
            case 8: return launch(std::integral_constant<int, 256>{});
            case 9: return launch(std::integral_constant<int, 512>{});
            case 10: return launch(std::integral_constant<int, 1024>{});
            case 11: return launch(std::integral_constant<int, 2048>{});
            default: return launch(std::integral_constant<int, 4096>{});
        }
    });
}

void nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, int64_t n,
                         int64_t blocksize, void* out, DType dtype, uintptr_t stream) {
    if (n < 0) throw std::invalid_argument("nf4_dequantize_cuda: n must be >= 0");
    const int blocksize_shift = log2_blocksize(blocksize);
    if (nested.absmax_q != nullptr && nested.nested_blocksize <= 0)
        throw std::invalid_argument("nf4_dequantize_cuda: nested_blocksize must be > 0");
    const AbsmaxSource src{absmax,        nested.absmax_q,         nested.nested_absmax,
                           nested.nested_code, nested.offset, nested.nested_blocksize,
                           exact_log2(nested.nested_blocksize)};
    if (n == 0) return;
    dispatch_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        T* output = static_cast<T*>(out);
        constexpr int kPerVector = 16 / sizeof(T);
        const bool aligned = reinterpret_cast<uintptr_t>(output) % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(packed) % (kPerVector / 2) == 0;
        if (aligned) {
            const int64_t ntiles = ceil_div(n / kPerVector, int64_t{kThreads} * kDequantUnroll);
            nf4_dequantize_vec_kernel<T>
                <<<grid_for(ntiles), kThreads, 0, as_stream(stream)>>>(packed, src, n, blocksize_shift, output);
            check_launch("nf4_dequantize_vec_kernel");
        } else {
            const unsigned grid = grid_for(ceil_div(n, kThreads));
            nf4_dequantize_scalar_kernel<T>
                <<<grid, kThreads, 0, as_stream(stream)>>>(packed, src, n, blocksize_shift, output);
            check_launch("nf4_dequantize_scalar_kernel");
        }
    });
}

void quantize_blockwise_8bit_cuda(const float* A, const uint8_t* lut, int64_t n, int64_t blocksize, uint8_t* out,
                                  float* absmax, uintptr_t stream) {
    if (n < 0) throw std::invalid_argument("quantize_blockwise_8bit_cuda: n must be >= 0");
    if (blocksize <= 0) throw std::invalid_argument("quantize_blockwise_8bit_cuda: blocksize must be > 0");
    if (n == 0) return;
    quantize_blockwise_8bit_kernel<<<grid_for(ceil_div(n, blocksize)), kThreads, 0, as_stream(stream)>>>(
        A, lut, n, blocksize, out, absmax);
    check_launch("quantize_blockwise_8bit_kernel");
}

int cuda_device_count(const char** error) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        if (error != nullptr) *error = cudaGetErrorString(err);
        return -1;
    }
    return count;
}

}  // namespace qk
