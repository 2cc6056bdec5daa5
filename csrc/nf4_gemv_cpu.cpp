// Decode GEMV with an NF4 weight on the CPU (lora.h: lora_gemv_nf4_cpu): y = x·Wᵀ + bias +
// scaling·xa·lora_Bᵀ for up to kLoraGemvMaxRows rows of x, reading the packed W once.
//
// Each weight is NF4[c] * absmax rounded once to x's dtype, the value nf4_dequantize_cpu writes;
// products and sums are fp32 and y is rounded once. Threads split the output features. The row
// kernel follows cpu_isa(): AVX512-BF16 (bf16), AVX-512, AVX2 + FMA (nf4_gemv_avx*.cpp), or the
// portable loop below.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "lora.h"
#include "nf4.h"
#include "nf4_gemv_cpu.h"
#include "parallel.h"

namespace qk {
namespace {

using gemv::Args;

// Partial sums per row: k is summed in kLanes interleaved sums (as SIMD lanes would), then the
// lanes pairwise; the error grows like that of torch's own blocked sums, not like one long chain.
constexpr int kLanes = 8;

float lane_total(float* lanes) {
    for (int width = kLanes / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    return lanes[0];
}

// Output features [n_begin, n_end), any layout: each weight of the flat W decoded on its own.
void gemv_rows_portable(const Args& a, int64_t n_begin, int64_t n_end) {
    gemv::AbsmaxCursor absmax(a);
    for (int64_t n = n_begin; n < n_end; ++n) {
        float acc[kLoraGemvMaxRows][kLanes] = {};
        int64_t cached_block = -1;
        float table[kNF4Codes];
        for (int64_t k = 0; k < a.K; ++k) {
            const int64_t i = n * a.K + k;
            const int64_t b = i >> a.log2_blocksize;
            if (b != cached_block) {
                const float scale = absmax(b);
                for (int c = 0; c < kNF4Codes; ++c) table[c] = gemv::round_to(a.dtype, gemv::kNF4[c] * scale);
                cached_block = b;
            }
            const uint8_t byte = a.packed[i / 2];
            const float w = table[i % 2 ? byte & 0xF : byte >> 4];
            for (int64_t m = 0; m < a.M; ++m) acc[m][k % kLanes] += gemv::load_as_float(a.x, a.dtype, m * a.K + k) * w;
        }
        for (int64_t m = 0; m < a.M; ++m) {
            float out = lane_total(acc[m]);
            if (a.bias) out += gemv::load_as_float(a.bias, a.dtype, n);
            if (a.rank) {
                float low_rank = 0.0f;
                for (int64_t j = 0; j < a.rank; ++j)
                    low_rank += a.xa[m * a.rank + j] * gemv::load_as_float(a.lora_B, a.dtype, n * a.rank + j);
                out += a.scaling * low_rank;
            }
            gemv::store_rounded(a.y, a.dtype, m * a.N + n, out);
        }
    }
}

// x copied for the SIMD kernels, as fp32 (or as bf16 for AVX512-BF16), into a buffer of the
// calling thread kept between calls (a fresh one would cost page faults on every call). Rows are
// padded to a stride 64 bytes past a multiple of 64: at a stride of a multiple of 4 KiB (K = 4096)
// the rows' lines of one k fall into one L1 set, and 16 rows of x evict each other.
// The buffer starts on a cache line, so that the kernels' 64-byte loads of x never straddle two.
void copy_x_rows(Args& a, bool as_bf16) {
    thread_local std::vector<float> buffer;
    const int64_t per_line = as_bf16 ? 32 : 16;
    a.x_stride = (a.K + per_line - 1) / per_line * per_line + per_line;
    const size_t floats = static_cast<size_t>(a.M * a.x_stride) / (as_bf16 ? 2 : 1) + 16;
    if (buffer.size() < floats) buffer.resize(floats);
    float* start = buffer.data() + (16 - reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) % 16) % 16;
    a.x_rows = start;
    for (int64_t m = 0; m < a.M; ++m) {
        if (as_bf16) {
            std::memcpy(reinterpret_cast<uint16_t*>(start) + m * a.x_stride,
                        static_cast<const uint16_t*>(a.x) + m * a.K, static_cast<size_t>(a.K) * 2);
            continue;
        }
        float* row = start + m * a.x_stride;
        const float* f32 = static_cast<const float*>(a.x) + m * a.K;
        const uint16_t* h = static_cast<const uint16_t*>(a.x) + m * a.K;
        switch (a.dtype) {
            case DType::F32: std::memcpy(row, f32, static_cast<size_t>(a.K) * 4); break;
            case DType::F16: gemv::fp16_to_float_f16c(h, a.K, row); break;  // AVX2 and up: F16C is there
            case DType::BF16:
                for (int64_t k = 0; k < a.K; ++k) row[k] = bf16_to_float(h[k]);
                break;
        }
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
    if (nested.absmax_q && nested.nested_blocksize <= 0)
        throw std::invalid_argument("lora_gemv_nf4_cpu: nested_blocksize must be > 0");
    if (N == 0) return;
    int log2_blocksize = 0;
    while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
    Args a{x, nullptr, 0, dtype, M, K, packed, absmax, nested, blocksize, log2_blocksize, N, bias, xa, lora_B, rank,
           scaling, y};
    void (*rows)(const Args&, int64_t, int64_t) = gemv_rows_portable;
#if defined(__x86_64__)
    const CpuIsa isa = cpu_isa();
    // vdpbf16ps does 32 multiply-adds in the time two fp32 FMAs do 32 (measured: 0.8 ns against
    // 0.2 ns each), so it pays only while decoding weights outweighs multiplying them
    if (isa >= CpuIsa::Avx512Bf16 && dtype == DType::BF16 && M <= gemv::kBf16PairsMaxRows) {
        rows = gemv::gemv_rows_avx512bf16;
        copy_x_rows(a, true);
    } else if (isa >= CpuIsa::Avx2Fma) {
        rows = isa >= CpuIsa::Avx512 ? gemv::gemv_rows_avx512 : gemv::gemv_rows_avx2;
        copy_x_rows(a, false);
    }
#endif
    // A weight is decoded once for all M rows and each row costs one FMA lane: per weight x row the
    // GEMV does about a sixteenth of the work of the kernels kMinItemsPerThread was set for. A small
    // layer of a decode step (512 x 512, M = 1) then stays on the calling thread, where waking a
    // worker that shares its core with torch's spinning OpenMP threads costs more than it saves.
    parallel_for(N, std::max<int64_t>(K, 1) * M / 16, num_threads, [&](int64_t first, int64_t last) { rows(a, first, last); });
}

}  // namespace qk
