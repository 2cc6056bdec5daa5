// Flash attention on the CPU: tiled online softmax in fp32, multithreaded with qk::parallel_for.
// Memory is linear in the sequence length, never seqlen_q x seqlen_k: per thread, 64 x 64 tiles
// plus fp32 copies of one kv head (and, in the backward, its dK / dV accumulators). No torch
// headers: callers pass raw pointers and element strides.
//
// Semantics are those of python/qlora_kernels/reference/attention.py:
// - query head h reads kv head h / (heads_q / heads_kv) (GQA / MQA);
// - query row i sits at position i + seqlen_k - seqlen_q (bottom-right causal alignment);
// - ALiBi adds slope[h] * (j - (i + seqlen_k - seqlen_q)) to the scaled score;
// - a row with no key left gets out = 0, lse = -inf and zero gradients;
// - varlen: packed [total_tokens, heads, head_dim] tensors, each sequence of cu_seqlens
//   attends only to itself (seqlen_q = seqlen_k per sequence).
#pragma once

#include <cstdint>

#include "nf4.h"  // DType

namespace qk {

// Element strides of a [batch, head, seq, head_dim] tensor; head_dim is unit-stride. In varlen
// mode `batch` is unused and `seq` steps over packed tokens. lse [batch, heads_q, seqlen_q]
// (varlen: [heads_q, total_tokens]) uses the same three strides.
struct AttentionStrides {
    int64_t batch = 0;
    int64_t head = 0;
    int64_t seq = 0;
};

struct AttentionArgs {
    const void* q = nullptr;  // [batch, heads_q, seqlen_q, head_dim]
    const void* k = nullptr;  // [batch, heads_kv, seqlen_k, head_dim]
    const void* v = nullptr;  // like k
    void* out = nullptr;      // like q; written by the forward, read by the backward
    float* lse = nullptr;     // fp32; written by the forward, read by the backward
    AttentionStrides q_strides, k_strides, v_strides, out_strides, lse_strides;
    DType dtype = DType::F32;  // of q, k, v and out (fp32 math whatever it is)

    int64_t batch = 0;  // varlen: number of sequences
    int64_t heads_q = 0;
    int64_t heads_kv = 0;
    int64_t seqlen_q = 0;  // varlen: total tokens, equal to seqlen_k
    int64_t seqlen_k = 0;
    int64_t head_dim = 0;  // 1 .. 256

    float softmax_scale = 1.0f;
    bool causal = true;
    const float* alibi_slopes = nullptr;        // [heads_q] or null
    const uint8_t* key_padding_mask = nullptr;  // [batch, seqlen_k] contiguous, 1 = attend; or null
    const int32_t* cu_seqlens = nullptr;        // [batch + 1] token offsets (varlen mode) or null
};

// Gradient tensors of the backward, each laid out like its forward counterpart.
struct AttentionGrads {
    const void* dout = nullptr;  // like out
    void* dq = nullptr;          // like q
    void* dk = nullptr;          // like k
    void* dv = nullptr;          // like v
    AttentionStrides dout_strides, dq_strides, dk_strides, dv_strides;
};

// Writes args.out and args.lse. Throws std::invalid_argument on inconsistent sizes.
void flash_attention_fwd_cpu(const AttentionArgs& args, int num_threads);

// Reads args.out and args.lse (from the forward), writes grads.dq / dk / dv. Threads own one
// (batch, kv head) each: dK / dV of that head and dQ of its query heads, so no atomics.
void flash_attention_bwd_cpu(const AttentionArgs& args, const AttentionGrads& grads, int num_threads);

}  // namespace qk
