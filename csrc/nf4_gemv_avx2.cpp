// AVX2 + FMA row kernel of the CPU decode GEMV (nf4_gemv_cpu.h), compiled for its instruction set
// by function attributes and called only when cpu_isa() reaches it.
//
// Per block, the 16 possible weights NF4[c] * absmax, rounded to the dtype, are computed into two
// registers of 8 fp32; 8 codes are looked up with two vpermps and a blend on the code's bit 3,
// and each looked-up group of weights is used for every row of x (register blocking over M) in
// fp32 FMAs against x (x_rows). A row may start inside a block or a byte: it is walked in segments of
// one block, 32 weights at a time, the rest of a segment and an odd first weight one by one.
#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

#include "nf4_gemv_cpu.h"

#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qk::gemv {
namespace {

struct Table {
    __m256 lo, hi;  // weights of codes 0-7 and 8-15
};

// NF4[c] * scale, the same IEEE product as nf4_dequantize_cpu, rounded once to the dtype.
template <DType kDtype>
QK_AVX2 inline __m256 rounded(__m256 t) {
    if constexpr (kDtype == DType::F32) {
        return t;
    } else if constexpr (kDtype == DType::F16) {
        return _mm256_cvtph_ps(_mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  // round to nearest even on the bits, a NaN quieted (float_convert.h's float_to_bf16)
        const __m256i u = _mm256_castps_si256(t);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i even = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
        const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
        const __m256 nan = _mm256_cmp_ps(t, t, _CMP_UNORD_Q);
        const __m256i bits = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(even), _mm256_castsi256_ps(quiet), nan));
        return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
}

template <DType kDtype>
QK_AVX2 inline Table weight_table(float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    return {rounded<kDtype>(_mm256_mul_ps(_mm256_loadu_ps(kNF4), s)),
            rounded<kDtype>(_mm256_mul_ps(_mm256_loadu_ps(kNF4 + 8), s))};
}

// Weights of the 8 codes in the low 8 bytes of `codes`.
QK_AVX2 inline __m256 lookup8(__m128i codes, const Table& t) {
    const __m256i idx = _mm256_cvtepu8_epi32(codes);
    const __m256 low = _mm256_permutevar8x32_ps(t.lo, idx), high = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 8 values of `dtype` from p[j..] as fp32.
template <DType kDtype>
QK_AVX2 inline __m256 load_as_float8(const void* p, int64_t j) {
    if constexpr (kDtype == DType::F32) {
        return _mm256_loadu_ps(static_cast<const float*>(p) + j);
    } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + j));
        if constexpr (kDtype == DType::F16) return _mm256_cvtph_ps(h);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
}

QK_AVX2 inline float lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[:, n] from the row's dot products: + bias[n] + scaling * (xa[m] . lora_B[n]), rounded once.
template <DType kDtype, int kRows>
QK_AVX2 inline void finish_column(const Args& a, int64_t n, const float* dot) {
    float low_rank[kRows] = {};
    if (a.rank) {
        __m256 sums[kRows];
        for (auto& s : sums) s = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= a.rank; j += 8) {
            const __m256 b = load_as_float8<kDtype>(a.lora_B, n * a.rank + j);
            for (int m = 0; m < kRows; ++m)
                sums[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(a.xa + m * a.rank + j), sums[m]);
        }
        for (int m = 0; m < kRows; ++m) low_rank[m] = lane_sum(sums[m]);
        for (; j < a.rank; ++j) {
            const float b = load_as_float(a.lora_B, kDtype, n * a.rank + j);
            for (int m = 0; m < kRows; ++m) low_rank[m] += a.xa[m * a.rank + j] * b;
        }
    }
    const float bias = a.bias ? load_as_float(a.bias, kDtype, n) : 0.0f;
    for (int m = 0; m < kRows; ++m) {
        float out = dot[m];
        if (a.bias) out += bias;
        if (a.rank) out += a.scaling * low_rank[m];
        store_rounded(a.y, kDtype, m * a.N + n, out);
    }
}

template <DType kDtype, int kRows>
QK_AVX2 void rows_fp32(const Args& a, int64_t n_begin, int64_t n_end) {
    // independent sums per row: FMA latency, not throughput, would bound a few rows of x
    constexpr int kSets = kRows <= 2 ? 4 : kRows <= 4 ? 2 : 1;
    const int64_t K = a.K, ld = a.x_stride;
    const __m128i nibble = _mm_set1_epi8(0x0F);
    AbsmaxCursor absmax(a);
    for (int64_t n = n_begin; n < n_end; ++n) {
        __m256 acc[kRows][kSets];
        for (auto& row : acc)
            for (auto& v : row) v = _mm256_setzero_ps();
        float dot[kRows] = {};
        int64_t i = n * K;  // flat index of W's next weight
        const int64_t end = i + K;
        const float* x = static_cast<const float*>(a.x_rows) - i;  // x[m * ld + i]: row m's input for weight i
        if (i & 1) {
            const float w = weight_at(a, absmax, i);
            for (int m = 0; m < kRows; ++m) dot[m] = x[m * ld + i] * w;
            ++i;
        }
        while (i < end) {
            const int64_t b = i >> a.log2_blocksize;
            const int64_t segment_end = std::min(end, (b + 1) << a.log2_blocksize);
            const Table table = weight_table<kDtype>(absmax(b));
            for (; i + 32 <= segment_end; i += 32) {
                const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.packed + i / 2));
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), lo = _mm_and_si128(bytes, nibble);
                const __m128i first = _mm_unpacklo_epi8(hi, lo), second = _mm_unpackhi_epi8(hi, lo);
                const __m256 w[4] = {lookup8(first, table), lookup8(_mm_srli_si128(first, 8), table),
                                     lookup8(second, table), lookup8(_mm_srli_si128(second, 8), table)};
#pragma GCC unroll 16
                for (int m = 0; m < kRows; ++m)
#pragma GCC unroll 4
                    for (int g = 0; g < 4; ++g)
                        acc[m][g % kSets] = _mm256_fmadd_ps(w[g], _mm256_loadu_ps(x + m * ld + i + 8 * g), acc[m][g % kSets]);
            }
            if (i < segment_end) {
                alignas(32) float weights[kNF4Codes];
                _mm256_store_ps(weights, table.lo);
                _mm256_store_ps(weights + 8, table.hi);
                for (; i < segment_end; ++i) {
                    const uint8_t byte = a.packed[i / 2];
                    const float w = weights[i % 2 ? byte & 0xF : byte >> 4];
                    for (int m = 0; m < kRows; ++m) dot[m] += x[m * ld + i] * w;
                }
            }
        }
        for (int m = 0; m < kRows; ++m) {
            __m256 sum = acc[m][0];
            for (int s = 1; s < kSets; ++s) sum = _mm256_add_ps(sum, acc[m][s]);
            dot[m] += lane_sum(sum);
        }
        finish_column<kDtype, kRows>(a, n, dot);
    }
}

using RowKernel = void (*)(const Args&, int64_t, int64_t);

template <DType kDtype, int... kRowsMinus1>
constexpr std::array<RowKernel, sizeof...(kRowsMinus1)> kernels_of(std::integer_sequence<int, kRowsMinus1...>) {
    return {&rows_fp32<kDtype, kRowsMinus1 + 1>...};
}

using AllRows = std::make_integer_sequence<int, kLoraGemvMaxRows>;

}  // namespace

void gemv_rows_avx2(const Args& a, int64_t n_begin, int64_t n_end) {
    static constexpr auto f32 = kernels_of<DType::F32>(AllRows{});
    static constexpr auto f16 = kernels_of<DType::F16>(AllRows{});
    static constexpr auto bf16 = kernels_of<DType::BF16>(AllRows{});
    const auto& kernels = a.dtype == DType::F32 ? f32 : a.dtype == DType::F16 ? f16 : bf16;
    kernels[a.M - 1](a, n_begin, n_end);
}

QK_AVX2 void fp16_to_float_f16c(const uint16_t* src, int64_t n, float* dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

}  // namespace qk::gemv

#endif
