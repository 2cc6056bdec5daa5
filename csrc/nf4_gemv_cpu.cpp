// Decode GEMV with an NF4 weight on the CPU (lora.h: lora_gemv_nf4_cpu): y = x·Wᵀ + bias +
// scaling·xa·lora_Bᵀ for up to kLoraGemvMaxRows rows of x, reading the packed W once.
//
// Each weight is NF4[c] * absmax rounded once to x's dtype, the value nf4_dequantize_cpu writes;
// products and sums are fp32 and y is rounded once. Threads split the output features.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "float_convert.h"
#include "lora.h"
#include "nf4.h"
#include "nf4_codebook.h"
#include "parallel.h"

namespace qk {
namespace {

constexpr float kNF4[kNF4Codes] = QK_NF4_VALUES;

// The product is rounded to fp32 on its own before the add (nf4_cpu.cpp's block_absmax, compiled
// with -ffp-contract=off): volatile keeps a multiply-add from fusing them whatever this file's flags.
float block_absmax(const float* absmax, const NestedAbsmax& nested, int64_t b) {
    if (!nested.absmax_q) return absmax[b];
    volatile float scaled = nested.nested_code[nested.absmax_q[b]] * nested.nested_absmax[b / nested.nested_blocksize];
    return scaled + *nested.offset;
}

// A value of `dtype` read as fp32, and fp32 rounded to `dtype`.
float load(const void* p, DType dtype, int64_t i) {
    switch (dtype) {
        case DType::F32: return static_cast<const float*>(p)[i];
        case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
        case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    }
    return 0.0f;
}

float round_to(DType dtype, float v) {
    switch (dtype) {
        case DType::F32: return v;
        case DType::F16: return fp16_to_float(float_to_fp16(v));
        case DType::BF16: return bf16_to_float(float_to_bf16(v));
    }
    return v;
}

void store(void* p, DType dtype, int64_t i, float v) {
    switch (dtype) {
        case DType::F32: static_cast<float*>(p)[i] = v; return;
        case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); return;
        case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); return;
    }
}

struct GemvArgs {
    const void* x;
    DType dtype;
    int64_t M, K;
    const uint8_t* packed;
    const float* absmax;
    NestedAbsmax nested;
    int64_t blocksize, N;
    const void* bias;
    const float* xa;
    const void* lora_B;
    int64_t rank;
    float scaling;
    void* y;
};

// Partial sums per row: k is summed in kLanes interleaved sums (as SIMD lanes would), then the
// lanes pairwise; the error grows like that of torch's own blocked sums, not like one long chain.
constexpr int kLanes = 8;

float lane_total(float* lanes) {
    for (int width = kLanes / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    return lanes[0];
}

// y[m, n] from the row's dot product: + bias[n] + scaling * (xa[m] . lora_B[n]).
float epilogue(const GemvArgs& a, int64_t m, int64_t n, float dot) {
    if (a.bias) dot += load(a.bias, a.dtype, n);
    if (a.rank) {
        float low_rank = 0.0f;
        for (int64_t j = 0; j < a.rank; ++j) low_rank += a.xa[m * a.rank + j] * load(a.lora_B, a.dtype, n * a.rank + j);
        dot += a.scaling * low_rank;
    }
    return dot;
}

// Output features [n_begin, n_end), any layout: element i of the flat W decoded on its own.
void gemv_rows_portable(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
        float acc[kLoraGemvMaxRows][kLanes] = {};
        int64_t cached_block = -1;
        float table[kNF4Codes];
        for (int64_t k = 0; k < a.K; ++k) {
            const int64_t i = n * a.K + k;
            const int64_t b = i / a.blocksize;
            if (b != cached_block) {
                const float scale = block_absmax(a.absmax, a.nested, b);
                for (int c = 0; c < kNF4Codes; ++c) table[c] = round_to(a.dtype, kNF4[c] * scale);
                cached_block = b;
            }
            const uint8_t byte = a.packed[i / 2];
            const float w = table[i % 2 ? byte & 0xF : byte >> 4];
            for (int64_t m = 0; m < a.M; ++m) acc[m][k % kLanes] += load(a.x, a.dtype, m * a.K + k) * w;
        }
        for (int64_t m = 0; m < a.M; ++m) store(a.y, a.dtype, m * a.N + n, epilogue(a, m, n, lane_total(acc[m])));
    }
}

}  // namespace

void lora_gemv_nf4_cpu(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                       const NestedAbsmax& nested, int64_t blocksize, int64_t N, const void* bias, const float* xa,
                       const void* lora_B, int64_t rank, float scaling, void* y, int num_threads) {
    if (M < 1 || M > kLoraGemvMaxRows)
        throw std::invalid_argument("lora_gemv_nf4_cpu: M (rows of x) must be in [1, " +
                                    std::to_string(kLoraGemvMaxRows) + "], got " + std::to_string(M));
    if (K < 0 || N < 0) throw std::invalid_argument("lora_gemv_nf4_cpu: K and N must be >= 0, got K=" +
                                                    std::to_string(K) + ", N=" + std::to_string(N));
    if (rank < 0) throw std::invalid_argument("lora_gemv_nf4_cpu: rank must be >= 0, got " + std::to_string(rank));
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)))
        throw std::invalid_argument("lora_gemv_nf4_cpu: blocksize must be a power of two in [32, 4096], got " +
                                    std::to_string(blocksize));
    if (rank > 0 && (xa == nullptr || lora_B == nullptr))
        throw std::invalid_argument("lora_gemv_nf4_cpu: rank " + std::to_string(rank) + " needs xa and lora_B");
    const GemvArgs a{x, dtype, M, K, packed, absmax, nested, blocksize, N, bias, xa, lora_B, rank, scaling, y};
    parallel_for(N, std::max<int64_t>(K, 1) * M, num_threads,
                 [&](int64_t first, int64_t last) { gemv_rows_portable(a, first, last); });
}

}  // namespace qk
