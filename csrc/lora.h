// Native pieces of the fused LoRA linear op (python/qlora_kernels/reference/lora.py):
// y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ with an NF4 base weight W [N, K].
// No torch headers: raw pointers, element counts, a dtype tag and (CUDA) a stream handle.
#pragma once

#include <cstdint>

#include "nf4.h"

namespace qk {

// Most rows of x the decode GEMVs take (larger M belongs to a GEMM).
constexpr int64_t kLoraGemvMaxRows = 16;

// ---- CPU (csrc/lora_cpu.cpp, csrc/nf4_gemv_cpu.cpp) ----

// Dequantizes the flat element range [start, start + count) of an NF4 tensor into out[0, count):
// out[i] = NF4[code(start + i)] * absmax(block of start + i), rounded once to `dtype`, bit for bit
// what nf4_dequantize_cpu gives for those elements (any start, not block aligned; double quant
// when nested.absmax_q is set). Multithreaded over blocks.
void nf4_dequantize_range_cpu(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested,
                              int64_t start, int64_t count, int64_t blocksize, void* out, DType dtype,
                              int num_threads);

// Dropout keep mask of n elements (reference/lora.py dropout_keep_mask): pair j is
// z = splitmix64(seed + (j + 1) * golden); keep[2j] = low32(z) >= threshold, keep[2j + 1] =
// high32(z) >= threshold. Counter-based, so the backward redraws the forward's mask.
void dropout_keep_mask_cpu(uint8_t* keep, int64_t n, uint64_t seed, uint64_t threshold, int num_threads);

// Decode GEMV, 1 <= M <= kLoraGemvMaxRows, the contract of lora_gemv_nf4_cuda below:
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] + scaling * sum_j xa[m, j] * lora_B[n, j]
// W is NF4, [N, K] row-major flat (any N, K: a row may start inside a block or a byte); each
// weight is NF4[c] * absmax rounded once to `dtype` (the value nf4_dequantize_cpu gives),
// products and sums in fp32, y rounded once. x [M, K], lora_B [N, rank], bias [N] (or null),
// y [M, N] are `dtype`; xa [M, rank] is fp32 (null when rank is 0). All contiguous.
// Multithreaded over output features. Throws std::invalid_argument for M out of range, a bad
// blocksize, negative sizes or rank.
void lora_gemv_nf4_cpu(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                       const NestedAbsmax& nested, int64_t blocksize, int64_t N, const void* bias, const float* xa,
                       const void* lora_B, int64_t rank, float scaling, void* y, int num_threads);

// ---- CUDA (kernels/lora_gemv.cu); all pointers are device pointers, stream is a cudaStream_t ----
#ifdef QK_WITH_CUDA

// Decode GEMV, 1 <= M <= 16:
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] + scaling * sum_j xa[m, j] * lora_B[n, j]
// W is NF4 ([N, K] row-major flat, `packed` 16-byte aligned); each weight is NF4[c] * absmax in
// fp32 rounded to `dtype` (the value nf4_dequantize_cuda gives), products and sums in fp32.
// x [M, K], lora_B [N, rank], bias [N] (or null), y [M, N] are `dtype`; xa [M, rank] is fp32
// (null when rank is 0). All contiguous.
void lora_gemv_nf4_cuda(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                        const float* absmax, const NestedAbsmax& nested, int64_t blocksize, int64_t N,
                        const void* bias, const float* xa, const void* lora_B, int64_t rank, float scaling,
                        void* y, uintptr_t stream);
#endif

}  // namespace qk
