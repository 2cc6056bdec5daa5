// Rotary position embeddings on the CPU: q and k rotated together, one pass over each, fp32
// math with one rounding per element, multithreaded over tokens with qk::parallel_for. No torch
// headers: callers pass raw pointers and element strides.
//
// Semantics are those of python/qlora_kernels/reference/rope.py (`rotate`): for token (b, s),
// with c = cos[b, s], s_ = sin[b, s] (rotary_dim values, half = rotary_dim / 2) and each head's
// pair (x1, x2) = (x[i], x[i + half]), i < half:
//   forward:  y[i] = x1 c[i] - x2 s_[i],   y[i + half] = x2 c[i + half] + x1 s_[i + half]
//   backward: y[i] = x1 c[i] + x2 s_[i + half],   y[i + half] = x2 c[i + half] - x1 s_[i]
// (the transpose, for gradients); columns rotary_dim .. head_dim - 1 are copied.
#pragma once

#include <cstdint>

#include "nf4.h"  // DType

namespace qk {

// Element strides of a [batch, heads, seq, head_dim] tensor; head_dim is unit-stride.
struct RopeStrides {
    int64_t batch = 0;
    int64_t head = 0;
    int64_t seq = 0;
};

struct RopeArgs {
    const void* q = nullptr;  // [batch, heads_q, seqlen, head_dim]
    const void* k = nullptr;  // [batch, heads_k, seqlen, head_dim]
    void* q_out = nullptr;    // like q (its own strides); must not overlap q or k
    void* k_out = nullptr;    // like k
    const void* cos = nullptr;  // [batch, seqlen, rotary_dim] by cos_strides (batch stride 0: shared)
    const void* sin = nullptr;  // like cos, sin_strides
    RopeStrides q_strides, k_strides, q_out_strides, k_out_strides;
    int64_t cos_batch_stride = 0, cos_seq_stride = 0, sin_batch_stride = 0, sin_seq_stride = 0;
    DType dtype = DType::F32;     // of q, k and the outputs
    DType cos_dtype = DType::F32;  // of cos and sin
    int64_t batch = 0;
    int64_t heads_q = 0;
    int64_t heads_k = 0;
    int64_t seqlen = 0;
    int64_t head_dim = 0;
    int64_t rotary_dim = 0;  // even, 2 .. head_dim
    bool backward = false;
};

// Throws std::invalid_argument on inconsistent sizes.
void rope_cpu(const RopeArgs& args, int num_threads);

}  // namespace qk
