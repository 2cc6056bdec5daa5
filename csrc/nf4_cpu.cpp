// NF4 quantize / dequantize and the 8-bit double-quant step on the CPU.
//
// Bit-exactness with bitsandbytes rests on doing the same fp32 operations in the same
// order; CMake compiles this file with -ffp-contract=off so no multiply-add is fused.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu_isa.h"
#include "float_convert.h"
#include "nf4.h"
#include "nf4_codebook.h"
#include "parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace qk {
namespace {

constexpr float kNF4[kNF4Codes] = QK_NF4_VALUES;
constexpr float kMinAbsmax = 1e-38f;

struct Midpoints {
    float m[kNF4Codes - 1];
    Midpoints() {
        for (int i = 0; i < kNF4Codes - 1; ++i) m[i] = (kNF4[i] + kNF4[i + 1]) / 2.0f;
    }
};
const Midpoints kMid;

// Index of the NF4 value for a scaled x in [-1, 1]: the number of midpoints strictly below
// it, so a tie takes the lower code (torch.bucketize, right=False).
inline uint8_t nf4_code_of(float scaled) {
    int code = 0;
    for (int i = 0; i < kNF4Codes - 1; ++i) code += scaled > kMid.m[i];
    return static_cast<uint8_t>(code);
}

struct Bf16 {
    uint16_t v;
};
struct Fp16 {
    uint16_t v;
};
inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) { return bf16_to_float(x.v); }
inline float to_float(Fp16 x) { return fp16_to_float(x.v); }

inline void store(float* out, int64_t i, float v) { out[i] = v; }
inline void store(Bf16* out, int64_t i, float v) { out[i].v = float_to_bf16(v); }
inline void store(Fp16* out, int64_t i, float v) { out[i].v = float_to_fp16(v); }

// max |x| that propagates NaN (as torch.amax does): a weight with a NaN anywhere gets a NaN
// absmax, so callers can refuse it from the small absmax tensor alone.
inline float nan_abs_max(float m, float x) {
    const float a = std::fabs(x);
    return (a > m || a != a) ? a : m;
}

// Codes of x * factor (or x / factor when kDivide), clamped to [-1, 1].
template <bool kDivide>
void nf4_codes_scalar(const float* x, int64_t len, float factor, uint8_t* codes) {
    for (int64_t i = 0; i < len; ++i) {
        const float scaled = kDivide ? x[i] / factor : x[i] * factor;
        codes[i] = nf4_code_of(std::min(1.0f, std::max(-1.0f, scaled)));
    }
}

float block_absmax_scalar(const float* x, int64_t len) {
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i) amax = nan_abs_max(amax, x[i]);
    return amax;
}

#if defined(__x86_64__)
// SIMD paths are picked at run time (cpu_isa.h), so one build runs on any x86-64 CPU (scalar
// otherwise).
bool use_ssse3() { return cpu_isa() >= CpuIsa::Ssse3; }
bool use_avx2() { return cpu_isa() >= CpuIsa::Avx2Fma; }

__attribute__((target("avx2"))) float block_absmax_avx2(const float* x, int64_t len) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float result = block_absmax_scalar(x + i, len - i);
    for (float lane : lanes) result = std::max(result, lane);
    return _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : result;
}

// 8 codes per step: the code is the number of midpoints below the scaled value, counted with
// 15 vector compares (ordered >, so a value on a midpoint takes the lower code, like the
// scalar path and torch.bucketize).
template <bool kDivide>
__attribute__((target("avx2"))) void nf4_codes_avx2(const float* x, int64_t len, float factor, uint8_t* codes) {
    __m256 mid[kNF4Codes - 1];
    for (int j = 0; j < kNF4Codes - 1; ++j) mid[j] = _mm256_set1_ps(kMid.m[j]);
    const __m256 f = _mm256_set1_ps(factor), lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 scaled = _mm256_min_ps(_mm256_max_ps(kDivide ? _mm256_div_ps(v, f) : _mm256_mul_ps(v, f), lo), hi);
        __m256i count = _mm256_setzero_si256();
        for (int j = 0; j < kNF4Codes - 1; ++j)  // a true compare is all ones, i.e. -1
            count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(scaled, mid[j], _CMP_GT_OQ)));
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(count), _mm256_extracti128_si256(count, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(words, words));
    }
    nf4_codes_scalar<kDivide>(x + i, len - i, factor, codes + i);
}
#endif

float block_absmax_of(const float* x, int64_t len) {
#if defined(__x86_64__)
    if (use_avx2()) return block_absmax_avx2(x, len);
#endif
    return block_absmax_scalar(x, len);
}

template <bool kDivide>
void nf4_codes(const float* x, int64_t len, float factor, uint8_t* codes) {
#if defined(__x86_64__)
    if (use_avx2()) return nf4_codes_avx2<kDivide>(x, len, factor, codes);
#endif
    nf4_codes_scalar<kDivide>(x, len, factor, codes);
}

template <typename T>
void quantize_blocks(const T* A, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax, int64_t first,
                     int64_t last) {
    float x[4096];
    uint8_t codes[4096];
    for (int64_t b = first; b < last; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        for (int64_t i = 0; i < len; ++i) x[i] = to_float(A[start + i]);
        const float amax = block_absmax_of(x, len);
        const float clamped = std::max(amax, kMinAbsmax);
        if (len == blocksize) {
            // full block: multiply by the reciprocal (bitsandbytes' rule for full blocks)
            absmax[b] = amax;
            nf4_codes<false>(x, len, 1.0f / clamped, codes);
        } else {
            // last partial block: true division, and the clamped absmax is what is stored
            absmax[b] = amax != amax ? amax : clamped;
            nf4_codes<true>(x, len, clamped, codes);
        }
        uint8_t* dst = packed + start / 2;
        const int64_t pairs = len / 2;
        for (int64_t i = 0; i < pairs; ++i) dst[i] = static_cast<uint8_t>((codes[2 * i] << 4) | codes[2 * i + 1]);
        if (len % 2) dst[pairs] = static_cast<uint8_t>((codes[len - 1] << 4) | kNF4ZeroCode);
    }
}

inline float block_absmax(const float* absmax, const NestedAbsmax& nested, int64_t b) {
    if (!nested.absmax_q) return absmax[b];
    const float scaled = nested.nested_code[nested.absmax_q[b]] * nested.nested_absmax[b / nested.nested_blocksize];
    return scaled + *nested.offset;
}

#if defined(__x86_64__)
// SSSE3 lookup: the block's 16 possible outputs are split into byte planes (plane k holds
// byte k of each value) and pshufb picks 16 of them per instruction.

template <int kWidth>
__attribute__((target("ssse3"))) inline void lookup_store(__m128i codes, const __m128i* planes, uint8_t* dst) {
    if constexpr (kWidth == 2) {
        const __m128i lo = _mm_shuffle_epi8(planes[0], codes), hi = _mm_shuffle_epi8(planes[1], codes);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_unpackhi_epi8(lo, hi));
    } else {
        const __m128i b0 = _mm_shuffle_epi8(planes[0], codes), b1 = _mm_shuffle_epi8(planes[1], codes);
        const __m128i b2 = _mm_shuffle_epi8(planes[2], codes), b3 = _mm_shuffle_epi8(planes[3], codes);
        const __m128i lo01 = _mm_unpacklo_epi8(b0, b1), hi01 = _mm_unpackhi_epi8(b0, b1);
        const __m128i lo23 = _mm_unpacklo_epi8(b2, b3), hi23 = _mm_unpackhi_epi8(b2, b3);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(lo01, lo23));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_unpackhi_epi16(lo01, lo23));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm_unpacklo_epi16(hi01, hi23));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 48), _mm_unpackhi_epi16(hi01, hi23));
    }
}

// Byte planes of the block's 16 outputs NF4[c] * scale, built in registers: the products
// are the same IEEE multiplies as the scalar path, so the values are identical.
__attribute__((target("ssse3"))) inline void fp32_byte_planes(float scale, __m128i* planes) {
    static const __m128 kCodes[4] = {_mm_setr_ps(kNF4[0], kNF4[1], kNF4[2], kNF4[3]),
                                     _mm_setr_ps(kNF4[4], kNF4[5], kNF4[6], kNF4[7]),
                                     _mm_setr_ps(kNF4[8], kNF4[9], kNF4[10], kNF4[11]),
                                     _mm_setr_ps(kNF4[12], kNF4[13], kNF4[14], kNF4[15])};
    // gathers byte k of each of the 4 floats of a vector into dword k
    const __m128i by_byte = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m128 s = _mm_set1_ps(scale);
    __m128i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm_shuffle_epi8(_mm_castps_si128(_mm_mul_ps(kCodes[i], s)), by_byte);
    // 4x4 dword transpose: plane k = byte k of values 0..15
    const __m128i a = _mm_unpacklo_epi32(r[0], r[1]), b = _mm_unpacklo_epi32(r[2], r[3]);
    const __m128i c = _mm_unpackhi_epi32(r[0], r[1]), d = _mm_unpackhi_epi32(r[2], r[3]);
    planes[0] = _mm_unpacklo_epi64(a, b);
    planes[1] = _mm_unpackhi_epi64(a, b);
    planes[2] = _mm_unpacklo_epi64(c, d);
    planes[3] = _mm_unpackhi_epi64(c, d);
}

// Byte planes of `table`, or, when it is null, computed in registers from a finite `scale`
// (fp32 and bf16 outputs only).
template <typename T>
__attribute__((target("ssse3"))) inline void byte_planes(float scale, const T* table, __m128i* planes) {
    constexpr int kWidth = sizeof(T);
    if (table != nullptr) {
        alignas(16) uint8_t plane_bytes[kWidth][kNF4Codes];
        const uint8_t* table_bytes = reinterpret_cast<const uint8_t*>(table);
        for (int c = 0; c < kNF4Codes; ++c)
            for (int k = 0; k < kWidth; ++k) plane_bytes[k][c] = table_bytes[c * kWidth + k];
        for (int k = 0; k < kWidth; ++k) planes[k] = _mm_load_si128(reinterpret_cast<const __m128i*>(plane_bytes[k]));
    } else if constexpr (std::is_same_v<T, float>) {
        fp32_byte_planes(scale, planes);
    } else if constexpr (std::is_same_v<T, Bf16>) {
        // bf16 = the top two bytes of the fp32 after round-to-nearest-even on the bits
        // (finite values only: no NaN payload to preserve)
        __m128i fp32[4];
        fp32_byte_planes(scale, fp32);
        const __m128i word0 = _mm_unpacklo_epi8(fp32[0], fp32[1]), word1 = _mm_unpacklo_epi8(fp32[2], fp32[3]);
        const __m128i word2 = _mm_unpackhi_epi8(fp32[0], fp32[1]), word3 = _mm_unpackhi_epi8(fp32[2], fp32[3]);
        // back to 16 u32 values (order 0-3, 4-7, 8-11, 12-15), round, keep bytes 2 and 3
        __m128i u[4] = {_mm_unpacklo_epi16(word0, word1), _mm_unpackhi_epi16(word0, word1),
                        _mm_unpacklo_epi16(word2, word3), _mm_unpackhi_epi16(word2, word3)};
        const __m128i bias = _mm_set1_epi32(0x7FFF), one = _mm_set1_epi32(1);
        const __m128i top = _mm_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
        for (auto& v : u) {
            v = _mm_add_epi32(v, _mm_add_epi32(bias, _mm_and_si128(_mm_srli_epi32(v, 16), one)));
            v = _mm_shuffle_epi8(v, top);  // low qword: byte 2 of each, then byte 3 of each
        }
        const __m128i lo01 = _mm_unpacklo_epi32(u[0], u[1]), lo23 = _mm_unpacklo_epi32(u[2], u[3]);
        planes[0] = _mm_unpacklo_epi64(lo01, lo23);
        planes[1] = _mm_unpackhi_epi64(lo01, lo23);
    }
}

// Dequantizes `nbytes` (a multiple of 16) packed bytes of one block.
template <typename T>
__attribute__((target("ssse3"))) void dequantize_run_ssse3(const uint8_t* src, int64_t nbytes, float scale,
                                                           const T* table, T* dst) {
    constexpr int kWidth = sizeof(T);
    __m128i planes[kWidth];
    byte_planes(scale, table, planes);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    uint8_t* out = reinterpret_cast<uint8_t*>(dst);
    for (int64_t j = 0; j < nbytes; j += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble), lo = _mm_and_si128(v, nibble);
        // element 2i is the high nibble of byte i
        lookup_store<kWidth>(_mm_unpacklo_epi8(hi, lo), planes, out + 2 * j * kWidth);
        lookup_store<kWidth>(_mm_unpackhi_epi8(hi, lo), planes, out + (2 * j + 16) * kWidth);
    }
}

// AVX2, bf16 output (the usual compute dtype): the 16 table values are computed and rounded
// 8 at a time, and each iteration turns 32 packed bytes (64 elements) into 4 stores.

__attribute__((target("avx2"))) void dequantize_run_avx2_bf16(const uint8_t* src, int64_t nbytes, float scale,
                                                              Bf16* dst) {
    const __m256 s = _mm256_set1_ps(scale);
    __m256i u[2] = {
        _mm256_castps_si256(_mm256_mul_ps(_mm256_setr_ps(kNF4[0], kNF4[1], kNF4[2], kNF4[3], kNF4[4], kNF4[5],
                                                         kNF4[6], kNF4[7]), s)),
        _mm256_castps_si256(_mm256_mul_ps(_mm256_setr_ps(kNF4[8], kNF4[9], kNF4[10], kNF4[11], kNF4[12],
                                                         kNF4[13], kNF4[14], kNF4[15]), s))};
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    for (auto& v : u)  // round to nearest even on the bits (finite values), keep the top half
        v = _mm256_srli_epi32(_mm256_add_epi32(v, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(v, 16), one))), 16);
    // 16 bf16 in order, then split into a low-byte and a high-byte plane
    const __m256i values = _mm256_permute4x64_epi64(_mm256_packus_epi32(u[0], u[1]), 0xD8);
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(values, split), 0xD8);
    const __m256i lo_plane = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(planes));
    const __m256i hi_plane = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(planes, 1));
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int64_t j = 0; j < nbytes; j += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), lo = _mm256_and_si256(v, nibble);
        // per 128-bit lane: codes of elements 0-15 | 32-47 and 16-31 | 48-63
        __m256i first[2], second[2];
        const __m256i codes[2] = {_mm256_unpacklo_epi8(hi, lo), _mm256_unpackhi_epi8(hi, lo)};
        for (int k = 0; k < 2; ++k) {
            const __m256i l = _mm256_shuffle_epi8(lo_plane, codes[k]), h = _mm256_shuffle_epi8(hi_plane, codes[k]);
            first[k] = _mm256_unpacklo_epi8(l, h);
            second[k] = _mm256_unpackhi_epi8(l, h);
        }
        __m256i* out = reinterpret_cast<__m256i*>(dst + 2 * j);
        _mm256_storeu_si256(out, _mm256_permute2x128_si256(first[0], second[0], 0x20));
        _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(first[1], second[1], 0x20));
        _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(first[0], second[0], 0x31));
        _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(first[1], second[1], 0x31));
    }
}
#endif

template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, int64_t n,
                       int64_t blocksize, T* out, int64_t first, int64_t last) {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16- or 32-bit outputs");
    T table[kNF4Codes];
    for (int64_t b = first; b < last; ++b) {
        // The 16 possible outputs of this block, each NF4[c] * absmax rounded once, exactly
        // the value an element-wise computation gives; the loops below are pure lookup.
        const float scale = block_absmax(absmax, nested, b);
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const int64_t pairs = len / 2;
        const uint8_t* src = packed + start / 2;
        T* dst = out + start;
        // fp32 / bf16 tables of a finite scale are built in SIMD registers; the rest (fp16,
        // NaN / Inf from a corrupted checkpoint, the tail of a partial block) from `table`
        [[maybe_unused]] const bool register_table = !std::is_same_v<T, Fp16> && std::isfinite(scale);
        bool table_ready = false;
        const auto fill_table = [&] {
            if (!table_ready)
                for (int c = 0; c < kNF4Codes; ++c) store(table, c, kNF4[c] * scale);
            table_ready = true;
        };
        int64_t done = 0;  // pairs (bytes) already written
#if defined(__x86_64__)
        if constexpr (std::is_same_v<T, Bf16>) {
            if (use_avx2() && register_table && pairs >= 32) {
                done = pairs & ~int64_t{31};
                dequantize_run_avx2_bf16(src, done, scale, dst);
            }
        }
        if (use_ssse3() && pairs - done >= 16) {
            const int64_t run = (pairs - done) & ~int64_t{15};
            if (!register_table) fill_table();
            dequantize_run_ssse3(src + done, run, scale, register_table ? nullptr : table, dst + 2 * done);
            done += run;
        }
#endif
        if (done < pairs || len % 2) fill_table();
        for (int64_t i = done; i < pairs; ++i) {
            const uint8_t byte = src[i];
            dst[2 * i] = table[byte >> 4];
            dst[2 * i + 1] = table[byte & 0xF];
        }
        if (len % 2) dst[len - 1] = table[src[pairs] >> 4];
    }
}

void check_blocksize(int64_t blocksize, int64_t max_blocksize) {
    if (blocksize < 32 || blocksize > max_blocksize || (blocksize & (blocksize - 1)))
        throw std::invalid_argument("blocksize must be a power of two in [32, " + std::to_string(max_blocksize) +
                                    "], got " + std::to_string(blocksize));
}

}  // namespace

void nf4_quantize_cpu(const void* A, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                      int num_threads) {
    check_blocksize(blocksize, 4096);
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    parallel_for(blocks, blocksize, num_threads, [&](int64_t first, int64_t last) {
        switch (dtype) {
            case DType::F32:
                return quantize_blocks(static_cast<const float*>(A), n, blocksize, packed, absmax, first, last);
            case DType::F16:
                return quantize_blocks(static_cast<const Fp16*>(A), n, blocksize, packed, absmax, first, last);
            case DType::BF16:
                return quantize_blocks(static_cast<const Bf16*>(A), n, blocksize, packed, absmax, first, last);
        }
        throw std::invalid_argument("unknown dtype tag");
    });
}

void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, int64_t n,
                        int64_t blocksize, void* out, DType dtype, int num_threads) {
    check_blocksize(blocksize, 4096);
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    parallel_for(blocks, blocksize, num_threads, [&](int64_t first, int64_t last) {
        switch (dtype) {
            case DType::F32:
                return dequantize_blocks(packed, absmax, nested, n, blocksize, static_cast<float*>(out), first, last);
            case DType::F16:
                return dequantize_blocks(packed, absmax, nested, n, blocksize, static_cast<Fp16*>(out), first, last);
            case DType::BF16:
                return dequantize_blocks(packed, absmax, nested, n, blocksize, static_cast<Bf16*>(out), first, last);
        }
        throw std::invalid_argument("unknown dtype tag");
    });
}

void quantize_blockwise_8bit_cpu(const float* A, const uint8_t* lut, int64_t n, int64_t blocksize, uint8_t* out,
                                 float* absmax, int num_threads) {
    if (blocksize <= 0) throw std::invalid_argument("blocksize must be positive");
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    parallel_for(blocks, blocksize, num_threads, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
            const int64_t start = b * blocksize;
            const int64_t end = std::min(n, start + blocksize);
            float amax = 0.0f;
            for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(A[i]));
            absmax[b] = amax;
            if (amax == 0.0f) {
                std::memset(out + start, 0, static_cast<size_t>(end - start));
                continue;
            }
            const float inv = 1.0f / amax;
            for (int64_t i = start; i < end; ++i) {
                const float v = std::min(1.0f, std::max(-1.0f, A[i] * inv));
                const float half = (v + 1.0f) * 0.5f;
                const float bin = half * 65535.0f + 0.5f;  // two roundings: -ffp-contract=off
                out[i] = lut[static_cast<uint16_t>(bin)];
            }
        }
    });
}

}  // namespace qk
