// AVX-512 row kernels of the CPU decode GEMV (nf4_gemv_cpu.h), compiled for their instruction
// set by function attributes and called only when cpu_isa() reaches it.
//
// Per block, the 16 possible weights NF4[c] * absmax are computed and rounded to the dtype in one
// register; each 16 packed bytes (32 weights) are then looked up with one permute per 16 or 32
// weights and used for every row of x (register blocking over M), sums in fp32:
// - rows_fp32 (any dtype): the table holds the rounded weights as fp32, vpermps looks up 16
//   weights at a time, FMAs against x in fp32 (x_f32).
// - rows_bf16_pairs (bf16, AVX512-BF16): the table holds the 16 bf16 weights, vpermw looks up
//   pairs (weight 2i, 2i + 1) as one dword, and vdpbf16ps multiplies them with x's bf16 pairs as
//   they lie in memory. Its products are exact (8-bit significands), but it treats subnormal
//   inputs as zero and flushes subnormal sums: terms below 2^-126 in magnitude are lost.
// A row may start inside a block (K not a multiple of the blocksize) or inside a byte (odd K):
// the row is walked in segments of one block each, the last 1..31 weights of a segment with
// masked loads, and an odd first weight on its own.
#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

#include "nf4_gemv_cpu.h"

#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define QK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

namespace qk::gemv {
namespace {

// fp32 -> bf16 round to nearest even on the bits (float_convert.h's float_to_bf16, NaN quieted),
// the result's bits in the top half of each dword, the low half zero.
QK_AVX512 inline __m512i bf16_rounded_bits(__m512 t) {
    const __m512i u = _mm512_castps_si512(t);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    const __mmask16 nan = _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x00400000));
    return _mm512_and_si512(_mm512_mask_mov_epi32(rounded, nan, quiet), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// The block's 16 possible weights, NF4[c] * scale rounded once to the dtype, as fp32: the same
// IEEE product as nf4_dequantize_cpu, so the same values.
template <DType kDtype>
QK_AVX512 inline __m512 weight_table(float scale) {
    const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(scale));
    if constexpr (kDtype == DType::F32) {
        return t;
    } else if constexpr (kDtype == DType::F16) {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        return _mm512_castsi512_ps(bf16_rounded_bits(t));
    }
}

// 16 values of `dtype` from p[j..] as fp32, lanes outside `mask` zero.
template <DType kDtype>
QK_AVX512 inline __m512 load_as_float16(const void* p, int64_t j, __mmask16 mask) {
    if constexpr (kDtype == DType::F32) {
        return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + j);
    } else {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + j);
        if constexpr (kDtype == DType::F16) return _mm512_cvtph_ps(h);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
}

inline __mmask16 first_lanes16(int64_t count) {
    return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

// y[:, n] from the row's dot products: + bias[n] + scaling * (xa[m] . lora_B[n]), rounded once.
template <DType kDtype, int kRows>
QK_AVX512 inline void finish_column(const Args& a, int64_t n, const float* dot) {
    float low_rank[kRows];
    if (a.rank) {
        __m512 sums[kRows];
        for (auto& s : sums) s = _mm512_setzero_ps();
        for (int64_t j = 0; j < a.rank; j += 16) {
            const __mmask16 mask = first_lanes16(a.rank - j);
            const __m512 b = load_as_float16<kDtype>(a.lora_B, n * a.rank + j, mask);
#pragma GCC unroll 16
            for (int m = 0; m < kRows; ++m)
                sums[m] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(mask, a.xa + m * a.rank + j), sums[m]);
        }
        for (int m = 0; m < kRows; ++m) low_rank[m] = _mm512_reduce_add_ps(sums[m]);
    }
    const float bias = a.bias ? load_as_float(a.bias, kDtype, n) : 0.0f;
    for (int m = 0; m < kRows; ++m) {
        float out = dot[m];
        if (a.bias) out += bias;
        if (a.rank) out += a.scaling * low_rank[m];
        store_rounded(a.y, kDtype, m * a.N + n, out);
    }
}

// Codes of 32 weights from 16 packed bytes (the high nibble first), in order: 0-15, 16-31.
QK_AVX512 inline void codes32(__m128i bytes, __m128i& first, __m128i& second) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), lo = _mm_and_si128(bytes, nibble);
    first = _mm_unpacklo_epi8(hi, lo);
    second = _mm_unpackhi_epi8(hi, lo);
}

template <DType kDtype, int kRows>
QK_AVX512 void rows_fp32(const Args& a, int64_t n_begin, int64_t n_end) {
    // independent sums per row: FMA latency, not throughput, would bound a row or two of x
    constexpr int kSets = kRows <= 2 ? 2 : 1;
    const int64_t K = a.K;
    AbsmaxCursor absmax(a);
    for (int64_t n = n_begin; n < n_end; ++n) {
        __m512 acc[kSets][kRows][2];
        for (auto& set : acc)
            for (auto& row : set) row[0] = row[1] = _mm512_setzero_ps();
        float dot[kRows] = {};
        int64_t i = n * K;  // flat index of W's next weight
        const int64_t end = i + K;
        const float* x = a.x_f32 - i;  // x[m * K + i]: row m's input for weight i
        if (i & 1) {
            const float w = weight_at(a, absmax, i);
            for (int m = 0; m < kRows; ++m) dot[m] = x[m * K + i] * w;
            ++i;
        }
        while (i < end) {
            const int64_t b = i >> a.log2_blocksize;
            const int64_t segment_end = std::min(end, (b + 1) << a.log2_blocksize);
            const __m512 table = weight_table<kDtype>(absmax(b));
            const uint8_t* src = a.packed + i / 2;
            for (; i + 32 * kSets <= segment_end; i += 32 * kSets, src += 16 * kSets) {
#pragma GCC unroll 4
                for (int s = 0; s < kSets; ++s) {
                    __m128i c0, c1;
                    codes32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * s)), c0, c1);
                    const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c0), table);
                    const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c1), table);
#pragma GCC unroll 16
                    for (int m = 0; m < kRows; ++m) {
                        const float* xm = x + m * K + i + 32 * s;
                        acc[s][m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[s][m][0]);
                        acc[s][m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[s][m][1]);
                    }
                }
            }
            // the last 1 to 32 * kSets - 1 weights of the segment, up to 32 at a time, masked
            while (i < segment_end) {
                const int64_t count = std::min<int64_t>(32, segment_end - i);
                const __mmask16 bytes = first_lanes16((count + 1) / 2);
                const __mmask16 lo = first_lanes16(count), hi = first_lanes16(count - 16);
                __m128i c0, c1;
                codes32(_mm_maskz_loadu_epi8(bytes, src), c0, c1);
                const __m512 w0 = _mm512_maskz_permutexvar_ps(lo, _mm512_cvtepu8_epi32(c0), table);
                const __m512 w1 = _mm512_maskz_permutexvar_ps(hi, _mm512_cvtepu8_epi32(c1), table);
#pragma GCC unroll 16
                for (int m = 0; m < kRows; ++m) {
                    const float* xm = x + m * K + i;
                    acc[0][m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(lo, xm), acc[0][m][0]);
                    acc[0][m][1] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(hi, xm + 16), acc[0][m][1]);
                }
                i += count;
                src += 16;
            }
        }
        for (int m = 0; m < kRows; ++m) {
            __m512 sum = _mm512_add_ps(acc[0][m][0], acc[0][m][1]);
            for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[s][m][0], acc[s][m][1]));
            dot[m] += _mm512_reduce_add_ps(sum);
        }
        finish_column<kDtype, kRows>(a, n, dot);
    }
}

// bf16 pairs: dword i of the result is (weight 2i, weight 2i + 1) of 16 packed bytes.
QK_AVX512BF16 inline __m512i pair_indices(__m128i bytes) {
    const __m512i d = _mm512_cvtepu8_epi32(bytes);
    // (byte >> 4) in the low word, (byte & 0xF) in the high word: A | (B & C)
    return _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16), _mm512_set1_epi32(0x000F0000),
                                     0xF8);
}

template <int kRows>
QK_AVX512BF16 void rows_bf16_pairs(const Args& a, int64_t n_begin, int64_t n_end) {
    // independent sums per row for a few rows of x (vdpbf16ps latency); two at most, so that a
    // block of 64 weights (the usual blocksize) runs in the unrolled loop
    constexpr int kSets = kRows <= 4 ? 2 : 1;
    const int64_t K = a.K;
    AbsmaxCursor absmax(a);
    for (int64_t n = n_begin; n < n_end; ++n) {
        __m512 acc[kSets][kRows];
        for (auto& set : acc)
            for (auto& row : set) row = _mm512_setzero_ps();
        float dot[kRows] = {};
        int64_t i = n * K;
        const int64_t end = i + K;
        const uint16_t* x = static_cast<const uint16_t*>(a.x) - i;
        if (i & 1) {
            const float w = weight_at(a, absmax, i);
            for (int m = 0; m < kRows; ++m) dot[m] = bf16_to_float(x[m * K + i]) * w;
            ++i;
        }
        while (i < end) {
            const int64_t b = i >> a.log2_blocksize;
            const int64_t segment_end = std::min(end, (b + 1) << a.log2_blocksize);
            // vcvtneps2bf16 rounds to nearest even like float_to_bf16, but flushes subnormal products
            // to zero: vdpbf16ps would read those weights as zero anyway
            const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(absmax(b)))));
            const uint8_t* src = a.packed + i / 2;
            for (; i + 32 * kSets <= segment_end; i += 32 * kSets, src += 16 * kSets) {
#pragma GCC unroll 4
                for (int s = 0; s < kSets; ++s) {
                    const __m512i idx = pair_indices(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * s)));
                    const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, table);
#pragma GCC unroll 16
                    for (int m = 0; m < kRows; ++m)
                        acc[s][m] = _mm512_dpbf16_ps(acc[s][m], w, (__m512bh)_mm512_loadu_si512(x + m * K + i + 32 * s));
                }
            }
            while (i < segment_end) {
                const int64_t count = std::min<int64_t>(32, segment_end - i);
                const __mmask32 weights = static_cast<__mmask32>((uint64_t{1} << count) - 1);
                const __m512i idx = pair_indices(_mm_maskz_loadu_epi8(first_lanes16((count + 1) / 2), src));
                const __m512bh w = (__m512bh)_mm512_maskz_permutexvar_epi16(weights, idx, table);
#pragma GCC unroll 16
                for (int m = 0; m < kRows; ++m)
                    acc[0][m] = _mm512_dpbf16_ps(acc[0][m], w, (__m512bh)_mm512_maskz_loadu_epi16(weights, x + m * K + i));
                i += count;
                src += 16;
            }
        }
        for (int m = 0; m < kRows; ++m) {
            __m512 sum = acc[0][m];
            for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
            dot[m] += _mm512_reduce_add_ps(sum);
        }
        finish_column<DType::BF16, kRows>(a, n, dot);
    }
}

using RowKernel = void (*)(const Args&, int64_t, int64_t);

template <DType kDtype, int... kRowsMinus1>
constexpr std::array<RowKernel, sizeof...(kRowsMinus1)> fp32_kernels(std::integer_sequence<int, kRowsMinus1...>) {
    return {&rows_fp32<kDtype, kRowsMinus1 + 1>...};
}

template <int... kRowsMinus1>
constexpr std::array<RowKernel, sizeof...(kRowsMinus1)> bf16_pair_kernels(std::integer_sequence<int, kRowsMinus1...>) {
    return {&rows_bf16_pairs<kRowsMinus1 + 1>...};
}

using AllRows = std::make_integer_sequence<int, kLoraGemvMaxRows>;

}  // namespace

void gemv_rows_avx512(const Args& a, int64_t n_begin, int64_t n_end) {
    static constexpr auto f32 = fp32_kernels<DType::F32>(AllRows{});
    static constexpr auto f16 = fp32_kernels<DType::F16>(AllRows{});
    static constexpr auto bf16 = fp32_kernels<DType::BF16>(AllRows{});
    const auto& kernels = a.dtype == DType::F32 ? f32 : a.dtype == DType::F16 ? f16 : bf16;
    kernels[a.M - 1](a, n_begin, n_end);
}

void gemv_rows_avx512bf16(const Args& a, int64_t n_begin, int64_t n_end) {
    static constexpr auto kernels = bf16_pair_kernels(AllRows{});
    kernels[a.M - 1](a, n_begin, n_end);
}

}  // namespace qk::gemv

#endif
