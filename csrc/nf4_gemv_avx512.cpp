// AVX-512 row kernels of the CPU decode GEMV (nf4_gemv_cpu.h), compiled for their instruction
// set by function attributes and called only when cpu_isa() reaches it.
//
// Per block, the 16 possible weights NF4[c] * absmax are computed and rounded to the dtype in one
// register; each 16 packed bytes (32 weights) are then looked up with one permute per 16 or 32
// weights and used for every row of x (register blocking over M), sums in fp32:
// - rows_fp32 (any dtype): the table holds the rounded weights as fp32, vpermps looks up 16
//   weights at a time, FMAs against x in fp32.
// - rows_bf16_pairs (bf16, AVX512-BF16, up to kBf16PairsMaxRows rows of x): the table holds the 16 bf16 weights, vpermw looks up
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

// x is read in tiles of k small enough to stay in L1 (kTileBytes for all rows of x) by a group of
// kGroup output features in turn, so that it comes from L2 once per group, not once per feature;
// the group's partial sums wait in memory between tiles. With x small enough, one tile is all of K.
constexpr int64_t kTileBytes = 16 << 10;
constexpr int64_t kGroup = 8;

struct Tiling {
    int64_t tile;  // elements of k per tile: a multiple of the blocksize (or of 32 below it), or K
    int64_t group;
};

inline Tiling tiling_of(const Args& a, int64_t x_element_bytes) {
    int64_t tile = kTileBytes / (a.M * x_element_bytes);
    if (tile >= a.K) return {std::max<int64_t>(a.K, 1), 1};
    tile = tile >= a.blocksize ? tile / a.blocksize * a.blocksize : std::max<int64_t>(32, tile / 32 * 32);
    return {tile, kGroup};
}

// Tiles jump between kGroup rows of W every few cache lines, faster than the hardware prefetcher
// follows: the packed bytes of a group's next tile are asked for while this one runs.
inline void prefetch_tile(const Args& a, int64_t n0, int64_t rows, int64_t k0, int64_t tile) {
    if (k0 >= a.K) {  // the next group's first tile
        n0 += rows;
        k0 = 0;
    }
    const int64_t n_end = std::min(a.N, n0 + rows);
    for (int64_t n = n0; n < n_end; ++n) {
        const int64_t first = (n * a.K + k0) / 2, last = (n * a.K + std::min(a.K, k0 + tile) + 1) / 2;
        for (int64_t byte = first; byte < last; byte += 64)
            _mm_prefetch(reinterpret_cast<const char*>(a.packed + byte), _MM_HINT_T0);
    }
}

// Adds weights [k_begin, k_end) of row n of W times x to the row's sums: vector sums `acc`, and
// `dot` for an odd first weight (a row or tile that starts inside a byte).
// kAcc sums per row of x: with 1, both halves of 32 weights go to one sum; with 2 * s, the halves
// of s consecutive groups of 32 go to sums of their own.
template <DType kDtype, int kRows, int kAcc>
QK_AVX512 inline __attribute__((always_inline)) void walk_fp32(const Args& a, AbsmaxCursor& absmax, int64_t n,
                                                               int64_t k_begin, int64_t k_end,
                                                               __m512 (&acc)[kAcc][kRows], float* dot) {
    constexpr int kSets = kAcc >= 2 ? kAcc / 2 : 1;
    constexpr int kHigh = kAcc >= 2 ? 1 : 0;  // the sum of the second 16 weights of a group
    const int64_t K = a.K, ld = a.x_stride;
    int64_t i = n * K + k_begin;  // flat index of W's next weight
    const int64_t end = n * K + k_end;
    const float* x = static_cast<const float*>(a.x_rows) - n * K;  // x[m * ld + i]: row m's input for weight i
    if (i & 1) {
        const float w = weight_at(a, absmax, i);
        for (int m = 0; m < kRows; ++m) dot[m] += x[m * ld + i] * w;
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
                    const float* xm = x + m * ld + i + 32 * s;
                    acc[kHigh * 2 * s][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[kHigh * 2 * s][m]);
                    acc[kHigh * (2 * s + 1)][m] =
                        _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[kHigh * (2 * s + 1)][m]);
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
                const float* xm = x + m * ld + i;
                acc[0][m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(lo, xm), acc[0][m]);
                acc[kHigh][m] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(hi, xm + 16), acc[kHigh][m]);
            }
            i += count;
            src += 16;
        }
    }
}

template <DType kDtype, int kRows>
QK_AVX512 void rows_fp32(const Args& a, int64_t n_begin, int64_t n_end) {
    // independent sums per row, as many as FMA latency asks for few rows of x and the 32 vector
    // registers allow for many
    constexpr int kAcc = kRows <= 2 ? 4 : kRows <= 8 ? 2 : 1;
    const Tiling t = tiling_of(a, sizeof(float));
    AbsmaxCursor absmax(a);
    __m512 partial[kGroup][kAcc][kRows];
    float dot[kGroup][kRows];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += t.group) {
        const int64_t rows = std::min(t.group, n_end - n0);
        for (int64_t r = 0; r < rows; ++r) {
            for (auto& sums : partial[r])
                for (auto& v : sums) v = _mm512_setzero_ps();
            for (float& d : dot[r]) d = 0.0f;
        }
        for (int64_t k0 = 0; k0 < a.K; k0 += t.tile) {
            if (t.group > 1) prefetch_tile(a, n0, rows, k0 + t.tile, t.tile);
            for (int64_t r = 0; r < rows; ++r) {
                __m512 acc[kAcc][kRows];
                for (int j = 0; j < kAcc; ++j)
                    for (int m = 0; m < kRows; ++m) acc[j][m] = partial[r][j][m];
                walk_fp32<kDtype, kRows, kAcc>(a, absmax, n0 + r, k0, std::min(a.K, k0 + t.tile), acc, dot[r]);
                for (int j = 0; j < kAcc; ++j)
                    for (int m = 0; m < kRows; ++m) partial[r][j][m] = acc[j][m];
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            for (int m = 0; m < kRows; ++m) {
                __m512 sum = partial[r][0][m];
                for (int j = 1; j < kAcc; ++j) sum = _mm512_add_ps(sum, partial[r][j][m]);
                dot[r][m] += _mm512_reduce_add_ps(sum);
            }
            finish_column<kDtype, kRows>(a, n0 + r, dot[r]);
        }
    }
}

// bf16 pairs: dword i of the result is (weight 2i, weight 2i + 1) of 16 packed bytes.
QK_AVX512BF16 inline __m512i pair_indices(__m128i bytes) {
    const __m512i d = _mm512_cvtepu8_epi32(bytes);
    // (byte >> 4) in the low word, (byte & 0xF) in the high word: A | (B & C)
    return _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16), _mm512_set1_epi32(0x000F0000),
                                     0xF8);
}

template <int kRows, int kSets>
QK_AVX512BF16 inline __attribute__((always_inline)) void walk_bf16_pairs(const Args& a, AbsmaxCursor& absmax,
                                                                         int64_t n, int64_t k_begin, int64_t k_end,
                                                                         __m512 (&acc)[kSets][kRows], float* dot) {
    const int64_t K = a.K, ld = a.x_stride;
    int64_t i = n * K + k_begin;
    const int64_t end = n * K + k_end;
    const uint16_t* x = static_cast<const uint16_t*>(a.x_rows) - n * K;
    if (i & 1) {
        const float w = weight_at(a, absmax, i);
        for (int m = 0; m < kRows; ++m) dot[m] += bf16_to_float(x[m * ld + i]) * w;
        ++i;
    }
    while (i < end) {
        const int64_t b = i >> a.log2_blocksize;
        const int64_t segment_end = std::min(end, (b + 1) << a.log2_blocksize);
        // vcvtneps2bf16 rounds to nearest even like float_to_bf16, but flushes subnormal products
        // to zero: vdpbf16ps would read those weights as zero anyway
        const __m512i table = _mm512_castsi256_si512(
            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(absmax(b)))));
        const uint8_t* src = a.packed + i / 2;
        for (; i + 32 * kSets <= segment_end; i += 32 * kSets, src += 16 * kSets) {
#pragma GCC unroll 4
            for (int s = 0; s < kSets; ++s) {
                const __m512i idx = pair_indices(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * s)));
                const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, table);
#pragma GCC unroll 16
                for (int m = 0; m < kRows; ++m)
                    acc[s][m] = _mm512_dpbf16_ps(acc[s][m], w, (__m512bh)_mm512_loadu_si512(x + m * ld + i + 32 * s));
            }
        }
        while (i < segment_end) {
            const int64_t count = std::min<int64_t>(32, segment_end - i);
            const __mmask32 weights = static_cast<__mmask32>((uint64_t{1} << count) - 1);
            const __m512i idx = pair_indices(_mm_maskz_loadu_epi8(first_lanes16((count + 1) / 2), src));
            const __m512bh w = (__m512bh)_mm512_maskz_permutexvar_epi16(weights, idx, table);
#pragma GCC unroll 16
            for (int m = 0; m < kRows; ++m)
                acc[0][m] = _mm512_dpbf16_ps(acc[0][m], w, (__m512bh)_mm512_maskz_loadu_epi16(weights, x + m * ld + i));
            i += count;
            src += 16;
        }
    }
}

template <int kRows>
QK_AVX512BF16 void rows_bf16_pairs(const Args& a, int64_t n_begin, int64_t n_end) {
    // independent sums per row for a few rows of x (vdpbf16ps latency); two at most, so that a
    // block of 64 weights (the usual blocksize) runs in the unrolled loop
    constexpr int kSets = kRows <= 4 ? 2 : 1;
    const Tiling t = tiling_of(a, sizeof(uint16_t));
    AbsmaxCursor absmax(a);
    __m512 partial[kGroup][kSets][kRows];
    float dot[kGroup][kRows];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += t.group) {
        const int64_t rows = std::min(t.group, n_end - n0);
        for (int64_t r = 0; r < rows; ++r) {
            for (auto& sums : partial[r])
                for (auto& v : sums) v = _mm512_setzero_ps();
            for (float& d : dot[r]) d = 0.0f;
        }
        for (int64_t k0 = 0; k0 < a.K; k0 += t.tile) {
            if (t.group > 1) prefetch_tile(a, n0, rows, k0 + t.tile, t.tile);
            for (int64_t r = 0; r < rows; ++r) {
                __m512 acc[kSets][kRows];
                for (int j = 0; j < kSets; ++j)
                    for (int m = 0; m < kRows; ++m) acc[j][m] = partial[r][j][m];
                walk_bf16_pairs<kRows, kSets>(a, absmax, n0 + r, k0, std::min(a.K, k0 + t.tile), acc, dot[r]);
                for (int j = 0; j < kSets; ++j)
                    for (int m = 0; m < kRows; ++m) partial[r][j][m] = acc[j][m];
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            for (int m = 0; m < kRows; ++m) {
                __m512 sum = partial[r][0][m];
                for (int j = 1; j < kSets; ++j) sum = _mm512_add_ps(sum, partial[r][j][m]);
                dot[r][m] += _mm512_reduce_add_ps(sum);
            }
            finish_column<DType::BF16, kRows>(a, n0 + r, dot[r]);
        }
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
    static constexpr auto kernels = bf16_pair_kernels(std::make_integer_sequence<int, kBf16PairsMaxRows>{});
    kernels[a.M - 1](a, n_begin, n_end);
}

}  // namespace qk::gemv

#endif
