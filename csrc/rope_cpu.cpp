// Rotary embeddings on the CPU (see rope.h). A work item is one token (b, s): its cos / sin
// row is converted to fp32 once, then every head of q and of k is rotated with it, so a
// token's rows of cos / sin are read once however many heads share them.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "elem.h"
#include "float_convert.h"
#include "parallel.h"
#include "rope.h"

namespace qk {
namespace {

float load_any(const void* base, int64_t index, DType dtype) {
    switch (dtype) {
        case DType::F32: return static_cast<const float*>(base)[index];
        case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
        default: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    }
}

// One head row: x -> y by the token's fp32 (c1, c2, s1, s2) halves. In the backward the
// caller passes (c1, c2, -s2, -s1) as (c1, c2, s1, s2): the same loop computes the transpose.
template <DType kType>
void rotate_row(const typename Elem<kType>::T* x, typename Elem<kType>::T* y, const float* c1, const float* c2,
                const float* s1, const float* s2, int64_t half, int64_t rotary_dim, int64_t head_dim) {
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = Elem<kType>::load(x[i]), x2 = Elem<kType>::load(x[i + half]);
        y[i] = Elem<kType>::store(x1 * c1[i] - x2 * s1[i]);
        y[i + half] = Elem<kType>::store(x2 * c2[i] + x1 * s2[i]);
    }
    std::copy(x + rotary_dim, x + head_dim, y + rotary_dim);
}

template <DType kType>
void rope_typed(const RopeArgs& a, int num_threads) {
    using T = typename Elem<kType>::T;
    const int64_t half = a.rotary_dim / 2;
    const int64_t heads = a.heads_q + a.heads_k;
    parallel_for(a.batch * a.seqlen, heads * a.head_dim, num_threads, [&](int64_t begin, int64_t end) {
        // c1 | c2 | s1 | s2, each `half` fp32 values
        std::vector<float> table(static_cast<size_t>(4 * half));
        float *c1 = table.data(), *c2 = c1 + half, *s1 = c2 + half, *s2 = s1 + half;
        for (int64_t token = begin; token < end; ++token) {
            const int64_t b = token / a.seqlen, s = token % a.seqlen;
            const int64_t cos_row = b * a.cos_batch_stride + s * a.cos_seq_stride;
            const int64_t sin_row = b * a.sin_batch_stride + s * a.sin_seq_stride;
            for (int64_t i = 0; i < half; ++i) {
                c1[i] = load_any(a.cos, cos_row + i, a.cos_dtype);
                c2[i] = load_any(a.cos, cos_row + half + i, a.cos_dtype);
                const float lo = load_any(a.sin, sin_row + i, a.cos_dtype);
                const float hi = load_any(a.sin, sin_row + half + i, a.cos_dtype);
                // the transpose: y1 = x1 c1 + x2 s_hi = x1 c1 - x2 (-s_hi), y2 = x2 c2 - x1 s_lo
                s1[i] = a.backward ? -hi : lo;
                s2[i] = a.backward ? -lo : hi;
            }
            for (int side = 0; side < 2; ++side) {
                const bool is_q = side == 0;
                const T* x = static_cast<const T*>(is_q ? a.q : a.k);
                T* y = static_cast<T*>(is_q ? a.q_out : a.k_out);
                const RopeStrides& xs = is_q ? a.q_strides : a.k_strides;
                const RopeStrides& ys = is_q ? a.q_out_strides : a.k_out_strides;
                const int64_t n_heads = is_q ? a.heads_q : a.heads_k;
                for (int64_t h = 0; h < n_heads; ++h) {
                    rotate_row<kType>(x + b * xs.batch + h * xs.head + s * xs.seq,
                                      y + b * ys.batch + h * ys.head + s * ys.seq, c1, c2, s1, s2, half,
                                      a.rotary_dim, a.head_dim);
                }
            }
        }
    });
}

}  // namespace

void rope_cpu(const RopeArgs& a, int num_threads) {
    if (a.batch < 0 || a.seqlen < 0 || a.heads_q < 0 || a.heads_k < 0)
        throw std::invalid_argument("rope_cpu: negative size");
    if (a.rotary_dim < 2 || a.rotary_dim % 2 || a.rotary_dim > a.head_dim)
        throw std::invalid_argument("rope_cpu: rotary_dim must be even, >= 2 and <= head_dim, got " +
                                    std::to_string(a.rotary_dim) + " with head_dim " + std::to_string(a.head_dim));
    switch (a.dtype) {
        case DType::F32: return rope_typed<DType::F32>(a, num_threads);
        case DType::F16: return rope_typed<DType::F16>(a, num_threads);
        case DType::BF16: return rope_typed<DType::BF16>(a, num_threads);
    }
    throw std::invalid_argument("rope_cpu: unknown dtype");
}

}  // namespace qk
