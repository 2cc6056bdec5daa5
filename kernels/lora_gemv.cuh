// Decode GEMV of the fused LoRA linear op with an NF4 base weight (M <= 16 rows of x):
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] + scaling * sum_j xa[m, j] * B[n, j]
// W's packed bytes are read from HBM exactly once; this kernel is bound by that stream.
//
// Layout (reference/nf4.py): W [N, K] row-major flat, element e in byte e / 2 (high nibble for
// even e), one absmax per `blocksize` consecutive flat elements. A "chunk" is 32 consecutive
// flat elements starting at a multiple of 32: 16 packed bytes (one uint4 load) inside one quant
// block (blocksize >= 32 is a power of two), so its absmax is fetched once.
//
// Launch: 256 threads (8 warps) per CTA, each warp owns kRows rows of W (4 when K % 32 == 0,
// else 1), so a CTA covers 32 (or 8) rows and the grid is ceil(N / that). Lanes take chunks
// lane, lane + 32, ... of the warp's rows (a warp load is 512 contiguous bytes per row) in
// batches of kUnroll chunks per row (2 for MT <= 2, else 1; 2 on the K % 32 != 0 path); the
// next batch is loaded right after the current one is consumed, and a tile's first batch
// before the CTA stages that tile of x. Registers are capped for 2 CTAs per SM, except
// MT >= 8 with K % 32 == 0 (1 CTA per SM, ~170 registers, no spills).
// x is staged in shared memory as fp32 [MT][tile_k] (MT = M rounded up to a power of two,
// rows past M are zeros), K in tiles of at most 64 KiB / MT floats. Each float4 "unit" is
// XOR-swizzled inside its 32-float group (unit u at u ^ ((u >> 3) & 7)), so the float4 reads of
// 8 lanes with consecutive chunks hit 8 different bank groups. Per 4 weights a lane does one
// float4 read of x per row of x, shared by its kRows rows of W.
// K % 32 != 0: a row starts inside a chunk, so the warp walks the flat chunks that overlap its
// row and masks elements outside [k_lo, k_hi) (x is then read one float at a time).
//
// Each weight is NF4[code] * absmax, one fp32 multiply (__fmul_rn: never fused), rounded to the
// compute dtype: exactly the value nf4_dequantize_cuda writes, so the GEMV equals "dequantize,
// then matmul with fp32 accumulation" up to summation order. Double-quant absmax is
// nested_code[q] * nested_absmax[b / nested_blocksize] + offset, two rounded fp32 steps.
// The warp's MT * kRows partial sums are reduced with a reduce-scatter butterfly (V / 2 + V / 4
// + ... shuffles instead of 5 * V), after which each lane owns distinct outputs and writes them
// with bias and the LoRA term: one store per y element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "cuda_common.cuh"
#include "nf4_codebook.h"

namespace qk::gemv {

// One copy per translation unit (each part launches its own kernels).
static __constant__ float kGemvNF4[kNF4Codes] = QK_NF4_VALUES;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Shared memory for the x tile; above 48 KiB a kernel must opt in (cudaFuncSetAttribute).
constexpr int kTileBytes = 64 * 1024;
constexpr int kTileFloats = kTileBytes / 4;
constexpr int kDefaultSmemBytes = 48 * 1024;

// A dequantized fp32 weight rounded to the compute dtype T (and back to fp32): one or two at once.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
    return to_float(from_float<T>(v));
}
__device__ __forceinline__ void round_pair(float&, float&, float*) {}
__device__ __forceinline__ void round_pair(float& a, float& b, __nv_bfloat16*) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);  // .x (low half) = a
    uint32_t bits;
    memcpy(&bits, &pair, 4);
    a = __uint_as_float(bits << 16);
    b = __uint_as_float(bits & 0xFFFF0000u);
}
__device__ __forceinline__ void round_pair(float& a, float& b, __half*) {
    const __half2 pair = __floats2half2_rn(a, b);
    a = __low2float(pair);
    b = __high2float(pair);
}

template <typename T>
struct GemvArgs {
    const T* __restrict__ x;  // [M, K]
    const uint8_t* __restrict__ packed;
    AbsmaxSource src;
    const T* __restrict__ bias;    // [N] or null
    const float* __restrict__ xa;  // [M, rank]
    const T* __restrict__ lora_B;  // [N, rank]
    T* __restrict__ y;             // [M, N]
    int64_t M, K, N, rank;
    int64_t nbytes;     // packed bytes, (N * K + 1) / 2
    int64_t tile_k;     // x tile capacity (floats per row of the tile), a multiple of 32
    int chunk_shift;    // log2(blocksize) - 5: chunk index -> quant block index
    float scaling;
};

// Swizzled position of element kk of a tile row (see the header comment).
__device__ __forceinline__ int swizzle(int kk) {
    const int unit = kk >> 2;
    return (((unit & ~7) | ((unit ^ (unit >> 3)) & 7)) << 2) | (kk & 3);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ uint32_t component(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The 16 packed bytes of chunk c; the last chunk of an N * K that is not a multiple of 32
// runs past the end of `packed` and is read byte by byte.
template <bool kChecked>
__device__ __forceinline__ uint4 load_chunk(const uint8_t* __restrict__ packed, int64_t c, int64_t nbytes) {
    if (!kChecked || c * 16 + 16 <= nbytes) return __ldg(reinterpret_cast<const uint4*>(packed) + c);
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i)
        if (c * 16 + i < nbytes) w[i / 4] |= static_cast<uint32_t>(__ldg(packed + c * 16 + i)) << (8 * (i % 4));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Table entry at a byte offset (code * 4).
__device__ __forceinline__ float nf4_at(const float* table, uint32_t byte_offset) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(table) + byte_offset);
}

// Reduce-scatter over the warp: on entry v[0..V) are per-lane partial sums, on exit v[i] for
// i < max(1, V / 32) is the warp total of value index i + scatter_base(lane) (every lane holds
// one when V < 32; lanes that differ only in the low bits hold copies).
template <int V, int kOffset>
__device__ __forceinline__ void reduce_scatter(float* v, int lane) {
    if constexpr (kOffset > 0) {
        if constexpr (V > 1) {
            constexpr int H = V / 2;
            const bool upper = (lane & kOffset) != 0;
#pragma unroll
            for (int i = 0; i < H; ++i) {
                const float send = upper ? v[i] : v[i + H];
                const float keep = upper ? v[i + H] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
            }
            reduce_scatter<H, kOffset / 2>(v, lane);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], kOffset);
            reduce_scatter<1, kOffset / 2>(v, lane);
        }
    }
}

template <int V>
__device__ __forceinline__ int scatter_base(int lane) {
    int base = 0;
    int count = V;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        if (count > 1) {
            count /= 2;
            if (lane & offset) base += count;
        }
    }
    return base;
}

template <int MT, bool kAligned>
struct Shape {
    static constexpr int kRows = kAligned ? 4 : 1;  // rows of W per warp
    static constexpr int kUnroll = kAligned ? (MT <= 2 ? 2 : 1) : 2;  // chunks per row per lane per batch
    // CTAs per SM the registers must allow (ptxas' own choice spills some variants at 64 / 128)
    static constexpr int kMinCtas = kAligned && MT >= 8 ? 1 : 2;
};

template <typename T, int MT, bool kAligned>
__global__ void __launch_bounds__(kThreads, (Shape<MT, kAligned>::kMinCtas))
    lora_gemv_nf4_kernel(const GemvArgs<T> a) {
    constexpr int R = Shape<MT, kAligned>::kRows;
    constexpr int U = Shape<MT, kAligned>::kUnroll;
    constexpr int V = MT * R;
    extern __shared__ float4 x_units[];  // [MT][tile_k / 4], swizzled
    float* x_tile = reinterpret_cast<float*>(x_units);
    __shared__ float table[kNF4Codes];
    if (threadIdx.x < kNF4Codes) table[threadIdx.x] = kGemvNF4[threadIdx.x];  // read after the first barrier

    const int lane = threadIdx.x % 32;
    const int64_t n0 = (int64_t{blockIdx.x} * kWarps + threadIdx.x / 32) * R;
    const float offset = a.src.absmax_q == nullptr ? 0.0f : __ldg(a.src.offset);
    const int tile_units = static_cast<int>(a.tile_k / 4);

    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;

    uint4 word[R][U];
    float scale[R][U];
    // Flat chunk of the tile's first element of row n0 + r, and the number of chunks of the tile
    // (the same for every row when K % 32 == 0; R is 1 otherwise).
    const auto first_chunk = [&](int r, int64_t k_lo) { return ((n0 + r) * a.K + k_lo) >> 5; };
    const auto chunk_count = [&](int64_t k_lo, int64_t k_hi) {
        return (((n0 * a.K + k_hi - 1) >> 5) - ((n0 * a.K + k_lo) >> 5)) + 1;
    };
    const auto load_batch = [&](int64_t k_lo, int64_t k_hi, int64_t batch) {
        const int64_t count = chunk_count(k_lo, k_hi);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int64_t base = first_chunk(r, k_lo);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int64_t ci = (batch * U + u) * 32 + lane;
                if (ci < count && n0 + r < a.N) {
                    word[r][u] = load_chunk<!kAligned>(a.packed, base + ci, a.nbytes);
                    scale[r][u] = block_absmax(a.src, offset, (base + ci) >> a.chunk_shift);
                } else {
                    word[r][u] = make_uint4(0u, 0u, 0u, 0u);
                    scale[r][u] = 0.0f;
                }
            }
        }
    };

    int64_t k_lo = 0;
    if (a.K > 0) load_batch(0, min64(a.K, a.tile_k), 0);
    while (k_lo < a.K) {
        const int64_t k_hi = min64(a.K, k_lo + a.tile_k);
        const int len = static_cast<int>(k_hi - k_lo);
        __syncthreads();  // the previous tile is consumed (and, the first time, `table` is written)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float* dst = x_tile + m * a.tile_k;
            if (m < a.M) {
                const T* row = a.x + m * a.K + k_lo;
                for (int kk = threadIdx.x; kk < len; kk += kThreads) dst[swizzle(kk)] = to_float(row[kk]);
            } else {
                for (int kk = threadIdx.x; kk < len; kk += kThreads) dst[swizzle(kk)] = 0.0f;
            }
        }
        __syncthreads();

        const int64_t count = chunk_count(k_lo, k_hi);
        const int64_t batches = ceil_div(count, int64_t{32} * U);
        for (int64_t batch = 0; batch < batches; ++batch) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int64_t ci = (batch * U + u) * 32 + lane;
                if (ci >= count) continue;
                if constexpr (kAligned) {
                    // chunk ci of the tile is units 8 ci .. 8 ci + 7 of every tile row
                    const int unit0 = static_cast<int>(ci) * 8;
                    const int flip = static_cast<int>(ci) & 7;
#pragma unroll
                    for (int q = 0; q < 8; ++q) {
                        float w[R][4];
#pragma unroll
                        for (int r = 0; r < R; ++r) {
                            // byte b of a word holds element 2b (high nibble) and 2b + 1
                            const uint32_t bits = component(word[r][u], q / 2);
                            const uint32_t hi4 = (bits >> 2) & 0x3C3C3C3Cu;  // code * 4 of even elements
                            const uint32_t lo4 = (bits << 2) & 0x3C3C3C3Cu;  // code * 4 of odd elements
                            const uint32_t b0 = (q % 2) * 2;
                            w[r][0] = __fmul_rn(nf4_at(table, __byte_perm(hi4, 0, 0x4440u + b0)), scale[r][u]);
                            w[r][1] = __fmul_rn(nf4_at(table, __byte_perm(lo4, 0, 0x4440u + b0)), scale[r][u]);
                            w[r][2] = __fmul_rn(nf4_at(table, __byte_perm(hi4, 0, 0x4441u + b0)), scale[r][u]);
                            w[r][3] = __fmul_rn(nf4_at(table, __byte_perm(lo4, 0, 0x4441u + b0)), scale[r][u]);
                            round_pair(w[r][0], w[r][1], static_cast<T*>(nullptr));
                            round_pair(w[r][2], w[r][3], static_cast<T*>(nullptr));
                        }
#pragma unroll
                        for (int m = 0; m < MT; ++m) {
                            const float4 xv = x_units[m * tile_units + unit0 + (q ^ flip)];
#pragma unroll
                            for (int r = 0; r < R; ++r) {
                                float s = acc[m * R + r];
                                s = fmaf(xv.x, w[r][0], s);
                                s = fmaf(xv.y, w[r][1], s);
                                s = fmaf(xv.z, w[r][2], s);
                                s = fmaf(xv.w, w[r][3], s);
                                acc[m * R + r] = s;
                            }
                        }
                    }
                } else {
                    // row-relative k of the chunk's first element; only [k_lo, k_hi) counts
                    const int64_t k0 = ((first_chunk(0, k_lo) + ci) << 5) - n0 * a.K;
#pragma unroll
                    for (int j = 0; j < 32; ++j) {
                        const int64_t k = k0 + j;
                        if (k < k_lo || k >= k_hi) continue;
                        const uint32_t byte = component(word[0][u], j / 8) >> (8 * ((j / 2) % 4));
                        const uint32_t code = (j % 2 == 0 ? byte >> 4 : byte) & 0xFu;
                        const float w = round_to<T>(__fmul_rn(table[code], scale[0][u]));
                        const int pos = swizzle(static_cast<int>(k - k_lo));
#pragma unroll
                        for (int m = 0; m < MT; ++m) acc[m] = fmaf(x_tile[m * a.tile_k + pos], w, acc[m]);
                    }
                }
            }
            // the next batch: of this tile, else the first of the next tile (in flight while
            // the CTA stages that tile)
            if (batch + 1 < batches)
                load_batch(k_lo, k_hi, batch + 1);
            else if (k_hi < a.K)
                load_batch(k_hi, min64(a.K, k_hi + a.tile_k), 0);
        }
        k_lo = k_hi;
    }

    reduce_scatter<V, 16>(acc, lane);
    constexpr int kHeld = V >= 32 ? V / 32 : 1;
    const bool writer = V >= 32 || (lane & (32 / V - 1)) == 0;
    const int base = scatter_base<V>(lane);
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
        const int index = base + i;  // m * R + r
        const int m = index / R;
        const int64_t n = n0 + index % R;
        if (!writer || m >= a.M || n >= a.N) continue;
        float out = acc[i];
        if (a.bias != nullptr) out += to_float(a.bias[n]);
        float low_rank = 0.0f;
        for (int64_t j = 0; j < a.rank; ++j)
            low_rank = fmaf(__ldg(a.xa + m * a.rank + j), to_float(a.lora_B[n * a.rank + j]), low_rank);
        out += a.scaling * low_rank;
        a.y[m * a.N + n] = from_float<T>(out);
    }
}

// Opts a kernel into more than 48 KiB of dynamic shared memory, once per device (lora_gemv.cu).
void allow_tile_smem(const void* kernel, int bytes);

template <typename T, int MT, bool kAligned>
void launch_kernel(GemvArgs<T> args, cudaStream_t stream) {
    constexpr int kRowsPerCta = kWarps * Shape<MT, kAligned>::kRows;
    const int64_t grid = ceil_div(args.N, kRowsPerCta);
    if (grid > INT_MAX) throw std::invalid_argument("lora_gemv_nf4_cuda: N is too large");
    args.tile_k = std::min<int64_t>(kTileFloats / MT, std::max<int64_t>(32, ceil_div(args.K, 32) * 32));
    const int smem = static_cast<int>(args.tile_k * MT * sizeof(float));
    allow_tile_smem(reinterpret_cast<const void*>(&lora_gemv_nf4_kernel<T, MT, kAligned>), smem);
    lora_gemv_nf4_kernel<T, MT, kAligned><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(args);
    check_launch("lora_gemv_nf4_kernel");
}

template <typename T, int MT>
void launch_gemv(const GemvArgs<T>& args, cudaStream_t stream) {
    if (args.K % 32 == 0)
        launch_kernel<T, MT, true>(args, stream);
    else
        launch_kernel<T, MT, false>(args, stream);
}

// The GEMV for element type T, its kernel picked by the rows of x (M rounded up to a power of
// two) and by K % 32. Instantiated once per T, in lora_gemv_<dtype>.cu, so that the three parts
// compile in parallel; every other file only declares it.
template <typename T>
void launch_lora_gemv(const GemvArgs<T>& args, cudaStream_t stream) {
    if (args.M == 1) return launch_gemv<T, 1>(args, stream);
    if (args.M == 2) return launch_gemv<T, 2>(args, stream);
    if (args.M <= 4) return launch_gemv<T, 4>(args, stream);
    if (args.M <= 8) return launch_gemv<T, 8>(args, stream);
    return launch_gemv<T, 16>(args, stream);
}

extern template void launch_lora_gemv<float>(const GemvArgs<float>&, cudaStream_t);
extern template void launch_lora_gemv<__half>(const GemvArgs<__half>&, cudaStream_t);
extern template void launch_lora_gemv<__nv_bfloat16>(const GemvArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace qk::gemv
