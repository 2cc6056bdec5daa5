// Flash attention on the CPU: tiled online softmax in fp32, multithreaded with qk::parallel_for.
// Memory is linear in the sequence length, never seqlen_q x seqlen_k: per thread, 64 x 64 tiles
// plus fp32 copies of one kv head (in the backward, of one key split's blocks and their dK / dV
// accumulators, plus the partial dQ buffers described at flash_attention_bwd_cpu). No torch
// headers: callers pass raw pointers and element strides.
//
// Semantics are those of python/qlora_kernels/reference/attention.py:
// - query head h reads kv head h / (heads_q / heads_kv) (GQA / MQA);
// - query row i sits at position r = i + seqlen_k - seqlen_q (bottom-right alignment); key j is
//   seen when j <= r (causal), r - window_left <= j (window_left >= 0) and j <= r + window_right
//   (window_right >= 0). Only the key blocks some row of a query block may see are computed, so
//   a sliding window costs O(seqlen_q * window), not O(seqlen_q * seqlen_k);
// - score = softmax_scale * q.k, then softcap * tanh(score / softcap) when softcap > 0, then
//   ALiBi's -slope[h] * |j - r|;
// - sinks[h] adds exp(sinks[h]) to every row's softmax denominator (lse includes it);
// - a row with no key left gets out = 0, lse = -inf (sinks[h] with sinks) and zero gradients;
// - varlen: packed [total_tokens, heads, head_dim] tensors, sequence b's queries are
//   cu_seqlens[b] .. cu_seqlens[b + 1] and its keys those of cu_seqlens_k (or of cu_seqlens
//   when null); it attends only to itself, aligned as above by its own lengths.
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
    int64_t seqlen_q = 0;  // varlen: total query tokens
    int64_t seqlen_k = 0;  // varlen: total key tokens
    int64_t head_dim = 0;  // 1 .. 256

    float softmax_scale = 1.0f;
    bool causal = true;
    int64_t window_left = -1;   // -1: unbounded
    int64_t window_right = -1;  // -1: unbounded
    float softcap = 0.0f;       // 0: none
    const float* alibi_slopes = nullptr;        // [heads_q] or null
    const float* sinks = nullptr;               // [heads_q] or null
    const uint8_t* key_padding_mask = nullptr;  // [batch, seqlen_k] contiguous, 1 = attend; or null
    const int32_t* cu_seqlens = nullptr;        // [batch + 1] query token offsets (varlen mode) or null
    const int32_t* cu_seqlens_k = nullptr;      // [batch + 1] key token offsets, or null: those of cu_seqlens
};

// Gradient tensors of the backward, each laid out like its forward counterpart.
struct AttentionGrads {
    const void* dout = nullptr;  // like out
    void* dq = nullptr;          // like q
    void* dk = nullptr;          // like k
    void* dv = nullptr;          // like v
    const float* dlse = nullptr;  // like lse (its own strides), or null: no gradient flows into lse
    float* dsinks = nullptr;      // [heads_q] when args.sinks is given
    AttentionStrides dout_strides, dq_strides, dk_strides, dv_strides, dlse_strides;
};

// Writes args.out and args.lse. Throws std::invalid_argument on inconsistent sizes.
void flash_attention_fwd_cpu(const AttentionArgs& args, int num_threads);

// Reads args.out and args.lse (from the forward), writes grads.dq / dk / dv (and dsinks). Work
// units are (batch, kv head, key split), so batch 1 with few kv heads still fills the threads: a
// unit owns dK / dV of its key blocks and writes a partial dQ; partials and dsinks are summed
// afterwards in a fixed order. Splits follow from the shape alone (up to 16 units; at most 8
// splits of at least 256 keys), so the gradients are the same bits on any number of threads. With
// more than one split, the partial dQ buffers take splits * heads_q * head_dim * 4 bytes per query
// token (at most 64 MiB), kept per calling thread for its next call.
void flash_attention_bwd_cpu(const AttentionArgs& args, const AttentionGrads& grads, int num_threads);

// Diagnostics for tests and benchmarks. The number of (query block, key block) tile steps run
// since the module loaded: it shows which work a call skips.
int64_t flash_attention_cpu_tile_steps();
// The number of backward work units (batch, kv head, key split) run since the module loaded.
int64_t flash_attention_cpu_backward_units();

}  // namespace qk
