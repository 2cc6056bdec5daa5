// NF4 quantize / dequantize and the 8-bit double-quant step on the CPU.
//
// Bit-exactness with bitsandbytes rests on doing the same fp32 operations in the same
// order; CMake compiles this file with -ffp-contract=off so no multiply-add is fused.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "float_convert.h"
#include "nf4.h"
#include "nf4_codebook.h"
#include "parallel.h"

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

template <typename T>
void quantize_blocks(const T* A, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax, int64_t first,
                     int64_t last) {
    uint8_t codes[4096];
    for (int64_t b = first; b < last; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        float amax = 0.0f;
        for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(to_float(A[start + i])));
        const float clamped = std::max(amax, kMinAbsmax);
        if (len == blocksize) {
            // full block: multiply by the reciprocal (bitsandbytes' rule for full blocks)
            absmax[b] = amax;
            const float inv = 1.0f / clamped;
            for (int64_t i = 0; i < len; ++i)
                codes[i] = nf4_code_of(std::min(1.0f, std::max(-1.0f, to_float(A[start + i]) * inv)));
        } else {
            // last partial block: true division, and the clamped absmax is what is stored
            absmax[b] = clamped;
            for (int64_t i = 0; i < len; ++i)
                codes[i] = nf4_code_of(std::min(1.0f, std::max(-1.0f, to_float(A[start + i]) / clamped)));
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

template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, int64_t n,
                       int64_t blocksize, T* out, int64_t first, int64_t last) {
    T table[kNF4Codes];
    for (int64_t b = first; b < last; ++b) {
        // The 16 possible outputs of this block, each NF4[c] * absmax rounded once, exactly
        // the value an element-wise computation gives; the loop below is then pure lookup.
        const float scale = block_absmax(absmax, nested, b);
        for (int c = 0; c < kNF4Codes; ++c) store(table, c, kNF4[c] * scale);
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const uint8_t* src = packed + start / 2;
        T* dst = out + start;
        const int64_t pairs = len / 2;
        for (int64_t i = 0; i < pairs; ++i) {
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
