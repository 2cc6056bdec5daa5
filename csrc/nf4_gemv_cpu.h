// Internal to the CPU decode GEMV (lora.h: lora_gemv_nf4_cpu): its arguments, what every code
// path shares (the walk over a row's blocks, the absmax of each block, the epilogue), and the
// row kernels of each instruction set (nf4_gemv_avx2.cpp, nf4_gemv_avx512.cpp).
#pragma once

#include <cstdint>

#include "float_convert.h"
#include "lora.h"
#include "nf4.h"
#include "nf4_codebook.h"

namespace qk::gemv {

inline constexpr float kNF4[kNF4Codes] = QK_NF4_VALUES;

struct Args {
    const void* x;       // [M, K] in dtype
    const void* x_rows;  // x as the SIMD kernels read it (fp32, or bf16 for AVX512-BF16), row m at m * x_stride
    int64_t x_stride;
    DType dtype;
    int64_t M, K;
    const uint8_t* packed;
    const float* absmax;
    NestedAbsmax nested;
    int64_t blocksize;
    int log2_blocksize;
    int64_t N;
    const void* bias;
    const float* xa;
    const void* lora_B;
    int64_t rank;
    float scaling;
    void* y;
};

// The absmax of the blocks of W in increasing order. With double quant each one is
// nested_code[q] * nested_absmax[b / nested_blocksize] + offset, the product rounded to fp32 on its
// own before the add, as nf4_cpu.cpp does (volatile: no multiply-add fusion whatever the flags);
// consecutive blocks step the nested index without a division.
class AbsmaxCursor {
public:
    explicit AbsmaxCursor(const Args& a) : a_(a) {}

    float operator()(int64_t b) {
        if (!a_.nested.absmax_q) return a_.absmax[b];
        if (b == block_ + 1) {
            if (++within_ == a_.nested.nested_blocksize) within_ = 0, ++group_;
        } else if (b != block_) {
            group_ = b / a_.nested.nested_blocksize;
            within_ = b % a_.nested.nested_blocksize;
        }
        block_ = b;
        volatile float scaled = a_.nested.nested_code[a_.nested.absmax_q[b]] * a_.nested.nested_absmax[group_];
        return scaled + *a_.nested.offset;
    }

private:
    const Args& a_;
    int64_t block_ = -2;  // no block yet: the first call divides
    int64_t group_ = 0, within_ = 0;
};

// A value of `dtype` read as fp32.
inline float load_as_float(const void* p, DType dtype, int64_t i) {
    switch (dtype) {
        case DType::F32: return static_cast<const float*>(p)[i];
        case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
        case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    }
    return 0.0f;
}

// fp32 rounded once to `dtype`, as an fp32 (exact: every fp16 / bf16 value is one).
inline float round_to(DType dtype, float v) {
    switch (dtype) {
        case DType::F32: return v;
        case DType::F16: return fp16_to_float(float_to_fp16(v));
        case DType::BF16: return bf16_to_float(float_to_bf16(v));
    }
    return v;
}

inline void store_rounded(void* p, DType dtype, int64_t i, float v) {
    switch (dtype) {
        case DType::F32: static_cast<float*>(p)[i] = v; return;
        case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); return;
        case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); return;
    }
}

// Weight i of the flat W, decoded on its own (the odd first element of a row that starts inside
// a byte).
inline float weight_at(const Args& a, AbsmaxCursor& absmax, int64_t i) {
    const uint8_t byte = a.packed[i / 2];
    return round_to(a.dtype, kNF4[i % 2 ? byte & 0xF : byte >> 4] * absmax(i >> a.log2_blocksize));
}

// Row kernels: y[:, n] for n in [n_begin, n_end), bias and LoRA term included. The AVX2 and
// AVX-512 ones read x from x_rows in fp32; the AVX512-BF16 one takes bf16 only, x_rows in bf16.
void gemv_rows_avx2(const Args& a, int64_t n_begin, int64_t n_end);
void gemv_rows_avx512(const Args& a, int64_t n_begin, int64_t n_end);
void gemv_rows_avx512bf16(const Args& a, int64_t n_begin, int64_t n_end);
// Most rows of x the AVX512-BF16 kernel takes; more go to the AVX-512 one.
inline constexpr int64_t kBf16PairsMaxRows = 8;

// fp16 to fp32 with F16C (any AVX2 level).
void fp16_to_float_f16c(const uint16_t* src, int64_t n, float* dst);

}  // namespace qk::gemv
