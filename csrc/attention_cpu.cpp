// CPU flash attention (see attention.h), FlashAttention-2 style: per query block, loop over key
// blocks with an online softmax; the backward recomputes probabilities from lse.
//
// All math is fp32 on tiles converted from the input dtype. The per-tile work (GEMMs, masking,
// softmax) is written once with GCC vector extensions and compiled twice: for AVX2 + FMA and
// for the baseline ISA, picked at load time (cpu_isa.h), so one wheel runs on any x86-64.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "cpu_isa.h"
#include "elem.h"
#include "float_convert.h"
#include "parallel.h"

namespace qk {
namespace {

// Query rows and keys per tile: the 64 x 64 score tile (16 KiB) and the Q / K / V tiles (up to
// 64 x 256 fp32) stay in L2 while they are reused.
constexpr int64_t BLOCK_M = 64;
constexpr int64_t BLOCK_N = 64;
constexpr int64_t kMaxHeadDim = 256;
// Register panel of the tile GEMM: 4 rows x 16 columns of C in eight 8-float accumulators.
constexpr int64_t kPanelRows = 4;
constexpr int64_t kPanelCols = 16;
constexpr int kLanes = 8;
constexpr float kInf = std::numeric_limits<float>::infinity();

// 8-float vectors whatever the ISA (two SSE registers on the baseline). They never cross a call
// boundary (all helpers are always_inline), so GCC's ABI note about passing them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));

// The helpers of the per-tile steps are forced inline so that each is compiled for the ISA of
// the step (AVX2 or baseline) that uses it.
#define QK_INLINE inline __attribute__((always_inline))

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

QK_INLINE vfloat load(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

QK_INLINE void store(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof(v)); }

// A shuffle rather than vfloat{x, ..., x}, which GCC assembles lane by lane instead of broadcasting.
QK_INLINE vfloat splat(float x) { return __builtin_shuffle(vfloat{x}, vint{}); }

QK_INLINE vfloat lane_index() { return vfloat{0, 1, 2, 3, 4, 5, 6, 7}; }

QK_INLINE float horizontal_max(const vfloat& v) {
    float m = v[0];
    for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
    return m;
}

QK_INLINE float horizontal_sum(const vfloat& v) {
    float s = v[0];
    for (int i = 1; i < kLanes; ++i) s += v[i];
    return s;
}

// exp(x) for x <= ~0 (a score minus its row max or lse), to about 1 ulp: 2^n * 2^f with
// n = round(x log2 e) and the degree-7 Taylor polynomial of 2^f on |f| <= 1/2. Results below
// about 2^-127 are exactly 0, so masked (-inf) scores get exactly zero probability and gradient.
QK_INLINE vfloat exp_nonpositive(const vfloat& x) {
    vfloat t = x * 1.44269504088896341f;
    t = t < -127.0f ? splat(-127.0f) : t;
    const vfloat n = (t + 12582912.0f) - 12582912.0f;  // round to nearest via 1.5 * 2^23
    const vfloat f = t - n;
    vfloat p = splat(1.5252733804059841e-05f);
    p = p * f + 1.5403530393381606e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.6181291076284772e-03f;
    p = p * f + 5.5504108664821580e-02f;
    p = p * f + 2.4022650695910071e-01f;
    p = p * f + 6.9314718055994531e-01f;
    p = p * f + 1.0f;
    const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;  // 2^n; n = -127 gives 0
    vfloat two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    return p * two_n;
}

// C[M x N] (+)= A B with A(m, k) = A[m * a_row + k * a_col] (so A or its transpose), B row-major
// [K x ldb], C row-major [M x ldc]. M is a multiple of kPanelRows and N of kPanelCols: tiles are
// zero-padded to full panels so the inner loop has no remainder. `acc += a * b` becomes an FMA
// under GCC's default -ffp-contract=fast (the gnu++17 mode CMake uses).
template <bool kAccumulate>
QK_INLINE void tile_gemm(float* C, int64_t ldc, const float* A, int64_t a_row, int64_t a_col, const float* B,
                         int64_t ldb, int64_t M, int64_t N, int64_t K) {
    // Panel columns outside, rows inside: the K x 16 strip of B stays in L1 across row panels.
    for (int64_t n = 0; n < N; n += kPanelCols) {
        for (int64_t m = 0; m < M; m += kPanelRows) {
            vfloat acc[kPanelRows][2];
#pragma GCC unroll 4
            for (int r = 0; r < kPanelRows; ++r) {
                float* c = C + (m + r) * ldc + n;
                acc[r][0] = kAccumulate ? load(c) : vfloat{};
                acc[r][1] = kAccumulate ? load(c + kLanes) : vfloat{};
            }
            const float* a = A + m * a_row;
            const float* b = B + n;
            for (int64_t k = 0; k < K; ++k, a += a_col, b += ldb) {
                const vfloat b0 = load(b), b1 = load(b + kLanes);
#pragma GCC unroll 4
                for (int r = 0; r < kPanelRows; ++r) {
                    const vfloat ar = splat(a[r * a_row]);
                    acc[r][0] += ar * b0;
                    acc[r][1] += ar * b1;
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < kPanelRows; ++r) {
                float* c = C + (m + r) * ldc + n;
                store(c, acc[r][0]);
                store(c + kLanes, acc[r][1]);
            }
        }
    }
}

// tanh(x), odd, to a few fp32 ulps: below |x| = 1/4 the Taylor series to x^9 (truncation
// < 1e-8 relative); above, (1 - e) / (1 + e) with e = exp(-2|x|) <= e^(-1/2), where 1 - e
// cancels at most one bit. Large |x| gives e = 0, so exactly +-1.
QK_INLINE vfloat tanh_of(const vfloat& x) {
    const vfloat ax = x < 0.0f ? -x : x;
    const vfloat x2 = ax * ax;
    vfloat series = splat(62.0f / 2835.0f);
    series = series * x2 - 17.0f / 315.0f;
    series = series * x2 + 2.0f / 15.0f;
    series = series * x2 - 1.0f / 3.0f;
    series = (series * x2 + 1.0f) * ax;
    const vfloat e = exp_nonpositive(-2.0f * ax);
    const vfloat t = ax < 0.25f ? series : (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

// What turns Q K^T of one (query block, key block) pair into scores, shared by the forward and
// the backward so that both mask identically. Row r (at position pos) sees keys
// [pos - lower, pos + upper]; the per-element tests run only in blocks that cross those edges.
struct ScoreBias {
    int64_t query_pos = 0;    // position (i + seqlen_k - seqlen_q) of the block's first row
    int64_t key_pos = 0;      // index of the block's first key
    int64_t upper = 0;
    int64_t lower = 0;
    bool upper_edge = false;  // some key of the block lies past pos + upper of the first row
    bool lower_edge = false;  // some key of the block lies before pos - lower of the last row
    float softcap = 0.0f;     // 0: none
    bool alibi = false;
    float alibi_slope = 0.0f;
    const float* key_bias = nullptr;  // [BLOCK_N]: 0 to attend, -inf for padded or absent keys; null: all 0
};

// softcap_grad (the backward's [rows][BLOCK_N], or null) receives softcap's derivative 1 - tanh^2.
QK_INLINE void bias_scores(float* scores, int64_t rows, const ScoreBias& bias, float* softcap_grad) {
    // copied out of `bias` so the stores to `scores` do not force reloads
    const bool alibi = bias.alibi, upper_edge = bias.upper_edge, lower_edge = bias.lower_edge;
    const float slope = bias.alibi_slope, softcap = bias.softcap;
    const float* key_bias = bias.key_bias;
    const int64_t key_pos = bias.key_pos, upper = bias.upper, lower = bias.lower;
    if (!key_bias && !alibi && !upper_edge && !lower_edge && softcap == 0.0f) return;
    const vint lane = vint{0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t r = 0; r < rows; ++r) {
        float* s = scores + r * BLOCK_N;
        const int64_t pos = bias.query_pos + r;
        for (int64_t c = 0; c < BLOCK_N; c += kLanes) {
            vfloat x = load(s + c);
            if (softcap > 0.0f) {
                const vfloat t = tanh_of(x / softcap);
                x = softcap * t;
                if (softcap_grad) store(softcap_grad + r * BLOCK_N + c, 1.0f - t * t);
            }
            if (key_bias) x += load(key_bias + c);
            if (alibi) {
                // -slope * |j - pos| with the distance exact in fp32, as the reference computes it
                const vfloat distance = lane_index() + static_cast<float>(key_pos + c - pos);
                x -= slope * (distance < 0.0f ? -distance : distance);
            }
            // key lane l of the group starting at key j0 is visible while
            // pos - lower - j0 <= l <= pos + upper - j0
            const int64_t j0 = key_pos + c;
            if (upper_edge) {
                const int64_t last_visible = std::clamp<int64_t>(pos + upper - j0, -1, kLanes);
                x = lane > static_cast<int32_t>(last_visible) ? splat(-kInf) : x;
            }
            if (lower_edge) {
                const int64_t first_visible = std::clamp<int64_t>(pos - lower - j0, 0, kLanes);
                x = lane < static_cast<int32_t>(first_visible) ? splat(-kInf) : x;
            }
            store(s + c, x);
        }
    }
}

// One key block of the forward for one query block; tiles are fp32, zero-padded.
struct ForwardTile {
    const float* q;    // [BLOCK_M][ld]: query rows times softmax_scale
    const float* kt;   // [head_dim][BLOCK_N]: the key block, transposed
    const float* v;    // [BLOCK_N][ld]
    float* scores;     // [BLOCK_M][BLOCK_N] scratch
    float* acc;        // [BLOCK_M][ld]: unnormalized output
    float* row_max;    // [BLOCK_M] running max of the scores
    float* row_sum;    // [BLOCK_M] running sum of exp(score - row_max)
    int64_t rows;      // query rows, a multiple of kPanelRows
    int64_t head_dim;
    int64_t ld;        // head_dim rounded up to kPanelCols
    ScoreBias bias;
};

QK_INLINE void forward_step_impl(const ForwardTile& t) {
    tile_gemm<false>(t.scores, BLOCK_N, t.q, t.ld, 1, t.kt, BLOCK_N, t.rows, BLOCK_N, t.head_dim);
    bias_scores(t.scores, t.rows, t.bias, nullptr);
    for (int64_t r = 0; r < t.rows; ++r) {
        float* s = t.scores + r * BLOCK_N;
        vfloat block_max = splat(-kInf);
        for (int64_t c = 0; c < BLOCK_N; c += kLanes) {
            const vfloat x = load(s + c);
            block_max = x > block_max ? x : block_max;
        }
        const float old_max = t.row_max[r];
        const float new_max = std::max(old_max, horizontal_max(block_max));
        // no visible key yet: -inf - -inf would be NaN, and these probabilities are all 0
        const float shift = new_max == -kInf ? 0.0f : new_max;
        vfloat sum = vfloat{};
        for (int64_t c = 0; c < BLOCK_N; c += kLanes) {
            const vfloat p = exp_nonpositive(load(s + c) - shift);
            store(s + c, p);
            sum += p;
        }
        const float rescale = std::exp(old_max - shift);  // 0 while old_max is -inf
        t.row_sum[r] = t.row_sum[r] * rescale + horizontal_sum(sum);
        t.row_max[r] = new_max;
        if (rescale != 1.0f) {
            float* o = t.acc + r * t.ld;
            for (int64_t d = 0; d < t.ld; d += kLanes) store(o + d, load(o + d) * rescale);
        }
    }
    tile_gemm<true>(t.acc, t.ld, t.scores, BLOCK_N, 1, t.v, t.ld, t.rows, t.ld, BLOCK_N);
}

// One (query block, key block) pair of the backward.
struct BackwardTile {
    const float* q;      // [BLOCK_M][ld]: query rows times softmax_scale
    const float* dout;   // [BLOCK_M][ld]
    const float* lse;    // [BLOCK_M]: +inf for rows without keys, whose probabilities are then 0
    const float* delta;  // [BLOCK_M]: rowsum(dout * out)
    const float* k;      // [BLOCK_N][ld]
    const float* kt;     // [head_dim][BLOCK_N]
    const float* vt;     // [head_dim][BLOCK_N]
    float* probs;        // [BLOCK_M][BLOCK_N] scratch
    float* dscores;      // [BLOCK_M][BLOCK_N] scratch
    float* dq;           // [BLOCK_M][ld]: accumulates dS K; softmax_scale is applied on store
    float* dk;           // [BLOCK_N][ld]: this key block's rows of the dK accumulator (dS^T Q scaled)
    float* dv;           // [BLOCK_N][ld]: this key block's rows of the dV accumulator
    float* softcap_grad;  // [BLOCK_M][BLOCK_N] scratch for softcap's 1 - tanh^2; null without softcap
    int64_t rows;        // a multiple of kPanelRows
    int64_t head_dim;
    int64_t ld;
    ScoreBias bias;
};

QK_INLINE void backward_step_impl(const BackwardTile& t) {
    tile_gemm<false>(t.probs, BLOCK_N, t.q, t.ld, 1, t.kt, BLOCK_N, t.rows, BLOCK_N, t.head_dim);
    bias_scores(t.probs, t.rows, t.bias, t.softcap_grad);
    for (int64_t r = 0; r < t.rows; ++r) {
        float* p = t.probs + r * BLOCK_N;
        for (int64_t c = 0; c < BLOCK_N; c += kLanes) store(p + c, exp_nonpositive(load(p + c) - t.lse[r]));
    }
    // dV += P^T dO
    tile_gemm<true>(t.dv, t.ld, t.probs, 1, BLOCK_N, t.dout, t.ld, BLOCK_N, t.ld, t.rows);
    // dP = dO V^T, then dS = P * (dP - delta) in place, times 1 - tanh^2 under softcap
    tile_gemm<false>(t.dscores, BLOCK_N, t.dout, t.ld, 1, t.vt, BLOCK_N, t.rows, BLOCK_N, t.head_dim);
    for (int64_t r = 0; r < t.rows; ++r) {
        const float* p = t.probs + r * BLOCK_N;
        float* ds = t.dscores + r * BLOCK_N;
        if (t.softcap_grad) {
            const float* g = t.softcap_grad + r * BLOCK_N;
            for (int64_t c = 0; c < BLOCK_N; c += kLanes)
                store(ds + c, load(p + c) * (load(ds + c) - t.delta[r]) * load(g + c));
        } else {
            for (int64_t c = 0; c < BLOCK_N; c += kLanes) store(ds + c, load(p + c) * (load(ds + c) - t.delta[r]));
        }
    }
    // dQ += dS K; dK += dS^T (Q softmax_scale)
    tile_gemm<true>(t.dq, t.ld, t.dscores, BLOCK_N, 1, t.k, t.ld, t.rows, t.ld, BLOCK_N);
    tile_gemm<true>(t.dk, t.ld, t.dscores, 1, BLOCK_N, t.q, t.ld, BLOCK_N, t.ld, t.rows);
}

void forward_step_baseline(const ForwardTile& t) { forward_step_impl(t); }
void backward_step_baseline(const BackwardTile& t) { backward_step_impl(t); }

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void forward_step_avx2(const ForwardTile& t) { forward_step_impl(t); }
__attribute__((target("avx2,fma"))) void backward_step_avx2(const BackwardTile& t) { backward_step_impl(t); }
#endif

using ForwardStep = void (*)(const ForwardTile&);
using BackwardStep = void (*)(const BackwardTile&);

std::atomic<int64_t> tile_steps{0};

ForwardStep forward_step() {
#if defined(__x86_64__)
    if (cpu_isa() >= CpuIsa::Avx2Fma) return forward_step_avx2;
#endif
    return forward_step_baseline;
}

BackwardStep backward_step() {
#if defined(__x86_64__)
    if (cpu_isa() >= CpuIsa::Avx2Fma) return backward_step_avx2;
#endif
    return backward_step_baseline;
}

// ---- dtype conversion, baseline ISA: off the hot path (each key once per worker, each query row
// once per query block) ----

// `rows` rows of a strided [rows][head_dim] tensor, times `scale`, into dst [rows_padded][ld];
// the padding rows and columns are zero so the tile GEMMs can run on whole panels.
template <DType kType>
void load_rows(const typename Elem<kType>::T* src, int64_t row_stride, int64_t rows, int64_t rows_padded,
               int64_t head_dim, int64_t ld, float scale, float* dst) {
    for (int64_t r = 0; r < rows; ++r) {
        const auto* s = src + r * row_stride;
        float* d = dst + r * ld;
        for (int64_t i = 0; i < head_dim; ++i) d[i] = Elem<kType>::load(s[i]) * scale;
        std::fill(d + head_dim, d + ld, 0.0f);
    }
    std::fill(dst + rows * ld, dst + rows_padded * ld, 0.0f);
}

// `rows` (<= BLOCK_N) rows of a strided [rows][head_dim] tensor into dst [head_dim][BLOCK_N].
template <DType kType>
void load_rows_transposed(const typename Elem<kType>::T* src, int64_t row_stride, int64_t rows, int64_t head_dim,
                          float* dst) {
    for (int64_t r = 0; r < rows; ++r) {
        const auto* s = src + r * row_stride;
        for (int64_t i = 0; i < head_dim; ++i) dst[i * BLOCK_N + r] = Elem<kType>::load(s[i]);
    }
    for (int64_t i = 0; i < head_dim; ++i) std::fill(dst + i * BLOCK_N + rows, dst + (i + 1) * BLOCK_N, 0.0f);
}

template <DType kType>
void store_row(const float* src, int64_t head_dim, float scale, typename Elem<kType>::T* dst) {
    for (int64_t i = 0; i < head_dim; ++i) dst[i] = Elem<kType>::store(src[i] * scale);
}

// ---- geometry shared by forward and backward ----

struct Sequence {
    int64_t first_q;  // varlen: offset of the sequence's queries in the packed tensors; dense: 0
    int64_t first_k;  // varlen: offset of its keys; dense: 0
    int64_t len_q;
    int64_t len_k;
};

Sequence sequence_of(const AttentionArgs& a, int64_t b) {
    if (!a.cu_seqlens) return {0, 0, a.seqlen_q, a.seqlen_k};
    const int32_t* cu_k = a.cu_seqlens_k ? a.cu_seqlens_k : a.cu_seqlens;
    return {a.cu_seqlens[b], cu_k[b], a.cu_seqlens[b + 1] - a.cu_seqlens[b], cu_k[b + 1] - cu_k[b]};
}

// Element offset of (sequence b, head h, packed token `token`) in a tensor; dense tensors count
// tokens from the start of sequence b.
int64_t offset_of(const AttentionArgs& a, const AttentionStrides& s, int64_t b, int64_t h, int64_t token) {
    const int64_t base = a.cu_seqlens ? 0 : b * s.batch;
    return base + h * s.head + token * s.seq;
}

// Far enough to stand for "unbounded" in position arithmetic without overflowing int64.
constexpr int64_t kUnbounded = int64_t{1} << 40;

// Row r sees keys [r - lower, r + upper] (before padding and sequence ends).
struct Window {
    int64_t lower;
    int64_t upper;
};

Window window_of(const AttentionArgs& a) {
    const int64_t lower = a.window_left >= 0 ? a.window_left : kUnbounded;
    const int64_t right = a.window_right >= 0 ? a.window_right : kUnbounded;
    return {lower, a.causal ? std::min<int64_t>(0, right) : right};
}

// The keys some row of the query block [row0, row0 + rows) may see: [begin, end), begin rounded
// down to a key block. The blocks outside are never computed (their probabilities are 0).
struct KeyRange {
    int64_t begin;
    int64_t end;
};

KeyRange key_range_of(const AttentionArgs& a, const Sequence& seq, int64_t row0, int64_t rows) {
    const Window w = window_of(a);
    const int64_t first = row0 + seq.len_k - seq.len_q, last = first + rows - 1;
    const int64_t begin = std::clamp<int64_t>(first - w.lower, 0, seq.len_k);
    const int64_t end = std::clamp<int64_t>(last + w.upper + 1, 0, seq.len_k);
    if (end <= begin) return {0, 0};
    return {begin / BLOCK_N * BLOCK_N, end};
}

// The bias of one key block [key0, key0 + BLOCK_N) for the query block [row0, row0 + rows):
// key_bias (a BLOCK_N scratch) gets -inf for keys past the sequence or padded, and is left out if
// there is none.
ScoreBias score_bias_of(const AttentionArgs& a, const Sequence& seq, int64_t b, int64_t h, int64_t row0,
                        int64_t rows, int64_t key0, float* key_bias) {
    const int64_t keys = std::min(BLOCK_N, seq.len_k - key0);
    const uint8_t* mask = a.key_padding_mask ? a.key_padding_mask + b * seq.len_k + key0 : nullptr;
    bool any_masked = false;
    for (int64_t n = 0; n < BLOCK_N; ++n) {
        const bool attend = n < keys && (!mask || mask[n]);
        key_bias[n] = attend ? 0.0f : -kInf;
        any_masked |= !attend;
    }
    const Window w = window_of(a);
    ScoreBias bias;
    bias.query_pos = row0 + seq.len_k - seq.len_q;
    bias.key_pos = key0;
    bias.upper = w.upper;
    bias.lower = w.lower;
    bias.upper_edge = key0 + BLOCK_N - 1 > bias.query_pos + w.upper;
    bias.lower_edge = key0 < bias.query_pos + rows - 1 - w.lower;
    bias.softcap = a.softcap;
    bias.alibi = a.alibi_slopes != nullptr;
    bias.alibi_slope = bias.alibi ? a.alibi_slopes[h] : 0.0f;
    bias.key_bias = any_masked ? key_bias : nullptr;
    return bias;
}

// ops.attention.check_args validates every argument before the kernels run; what is checked here
// is what the pointer arithmetic needs to stay inside the tensors.
void check_args(const AttentionArgs& a) {
    const auto fail = [](const std::string& what) { throw std::invalid_argument("flash_attention_cpu: " + what); };
    if (a.batch < 0 || a.heads_q < 0 || a.seqlen_q < 0 || a.seqlen_k < 0) fail("sizes must be non-negative");
    if (a.head_dim < 1 || a.head_dim > kMaxHeadDim)
        fail("head_dim must be in [1, " + std::to_string(kMaxHeadDim) + "], got " + std::to_string(a.head_dim));
    if (a.heads_kv < 1 || a.heads_q % a.heads_kv != 0)
        fail("heads_q (" + std::to_string(a.heads_q) + ") must be a multiple of heads_kv (" +
             std::to_string(a.heads_kv) + ")");
    if (!a.cu_seqlens) {
        if (a.cu_seqlens_k) fail("cu_seqlens_k needs cu_seqlens");
        return;
    }
    if (a.key_padding_mask) fail("key_padding_mask cannot be combined with cu_seqlens");
    if (!a.cu_seqlens_k && a.seqlen_q != a.seqlen_k)
        fail("q has " + std::to_string(a.seqlen_q) + " packed tokens and k " + std::to_string(a.seqlen_k) +
             ": pass cu_seqlens_k for keys packed apart from queries");
    const auto check_offsets = [&](const char* name, const int32_t* cu, int64_t total) {
        if (cu[0] != 0 || cu[a.batch] != total)
            fail(std::string(name) + " must start at 0 and end at the number of tokens (" + std::to_string(total) +
                 ")");
        for (int64_t b = 0; b < a.batch; ++b)
            if (cu[b + 1] < cu[b]) fail(std::string(name) + " must be non-decreasing");
    };
    check_offsets("cu_seqlens", a.cu_seqlens, a.seqlen_q);
    if (a.cu_seqlens_k) check_offsets("cu_seqlens_k", a.cu_seqlens_k, a.seqlen_k);
}

// Runs worker(next_item) on up to num_threads threads; each call sets up its scratch once, then
// processes the items next_item() hands out (in order; -1 when none is left). Handing items out
// on demand balances causal attention, where later query blocks cost more, and threads slowed by
// other load; each item's result does not depend on which thread computes it.
template <typename Worker>
void for_each_item(int64_t items, int64_t work_per_item, int num_threads, Worker&& worker) {
    std::atomic<int64_t> next{0};
    const auto next_item = [&]() -> int64_t {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        return i < items ? i : -1;
    };
    const int64_t workers = std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(items, 1));
    parallel_for(workers, items / workers * work_per_item, num_threads, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end; ++w) worker(next_item);
    });
}

// One kv head's keys and values in fp32, in the layouts the forward's tile steps read, converted
// on first use. They serve every query block and every query head of the GQA group, so a worker
// converts each key once rather than once per (query block, key block) pair. O(seqlen_k * head_dim).
template <DType kType>
class KeyValueTiles {
   public:
    explicit KeyValueTiles(const AttentionArgs& a) : a_(a), ld_(round_up(a.head_dim, kPanelCols)) {}

    // Makes keys [0, key_end) of kv head hk of sequence b available.
    void prepare(int64_t b, const Sequence& seq, int64_t hk, int64_t key_end) {
        const int64_t D = a_.head_dim;
        if (b != batch_ || hk != head_) {
            batch_ = b;
            head_ = hk;
            ready_ = 0;
            const int64_t keys = round_up(seq.len_k, BLOCK_N);
            kt_.resize(keys * D);
            v_.resize(keys * ld_);
        }
        using T = typename Elem<kType>::T;
        for (; ready_ < key_end; ready_ += BLOCK_N) {
            const int64_t keys = std::min(BLOCK_N, seq.len_k - ready_);
            const int64_t token = seq.first_k + ready_;
            const T* k_rows = static_cast<const T*>(a_.k) + offset_of(a_, a_.k_strides, b, hk, token);
            const T* v_rows = static_cast<const T*>(a_.v) + offset_of(a_, a_.v_strides, b, hk, token);
            load_rows_transposed<kType>(k_rows, a_.k_strides.seq, keys, D, kt_.data() + ready_ * D);
            load_rows<kType>(v_rows, a_.v_strides.seq, keys, BLOCK_N, D, ld_, 1.0f, v_.data() + ready_ * ld_);
        }
    }

    // The key block starting at key0 (a multiple of BLOCK_N).
    const float* kt(int64_t key0) const { return kt_.data() + key0 * a_.head_dim; }  // [head_dim][BLOCK_N]
    const float* v(int64_t key0) const { return v_.data() + key0 * ld_; }            // [BLOCK_N][ld]

   private:
    const AttentionArgs& a_;
    const int64_t ld_;
    int64_t batch_ = -1, head_ = -1, ready_ = 0;
    std::vector<float> kt_, v_;
};

struct ForwardItem {
    int64_t batch;
    int64_t head;
    int64_t row0;
};

// Grouped by kv head, so consecutive items reuse the kv head a worker has converted; within it the
// last query block (the costliest when causal) first, so the cheap ones fill in at the end.
std::vector<ForwardItem> forward_items_of(const AttentionArgs& a) {
    const int64_t group = a.heads_q / a.heads_kv;
    std::vector<ForwardItem> items;
    for (int64_t b = 0; b < a.batch; ++b) {
        const int64_t blocks = (sequence_of(a, b).len_q + BLOCK_M - 1) / BLOCK_M;
        for (int64_t hk = 0; hk < a.heads_kv; ++hk)
            for (int64_t blk = blocks - 1; blk >= 0; --blk)
                for (int64_t h = hk * group; h < (hk + 1) * group; ++h) items.push_back({b, h, blk * BLOCK_M});
    }
    return items;
}

template <DType kType>
void forward(const AttentionArgs& a, int num_threads) {
    using T = typename Elem<kType>::T;
    const T* q = static_cast<const T*>(a.q);
    T* out = static_cast<T*>(a.out);
    const int64_t D = a.head_dim, ld = round_up(D, kPanelCols), group = a.heads_q / a.heads_kv;
    const std::vector<ForwardItem> items = forward_items_of(a);
    const int64_t n_items = static_cast<int64_t>(items.size());
    const ForwardStep step = forward_step();

    const int64_t work = BLOCK_M * std::max<int64_t>(a.seqlen_k, 1) * D;
    for_each_item(n_items, work, num_threads, [&](const auto& next_item) {
        KeyValueTiles<kType> kv(a);
        std::vector<float> q_tile(BLOCK_M * ld), scores(BLOCK_M * BLOCK_N), acc(BLOCK_M * ld), row_max(BLOCK_M),
            row_sum(BLOCK_M), key_bias(BLOCK_N);
        for (int64_t i = next_item(); i >= 0; i = next_item()) {
            const ForwardItem it = items[i];
            const Sequence seq = sequence_of(a, it.batch);
            const int64_t rows = std::min(BLOCK_M, seq.len_q - it.row0), rows_padded = round_up(rows, kPanelRows);
            const int64_t token = seq.first_q + it.row0;
            load_rows<kType>(q + offset_of(a, a.q_strides, it.batch, it.head, token), a.q_strides.seq, rows,
                             rows_padded, D, ld, a.softmax_scale, q_tile.data());
            std::fill(acc.begin(), acc.end(), 0.0f);
            std::fill(row_max.begin(), row_max.end(), -kInf);
            std::fill(row_sum.begin(), row_sum.end(), 0.0f);

            const KeyRange keys = key_range_of(a, seq, it.row0, rows);
            kv.prepare(it.batch, seq, it.head / group, keys.end);
            for (int64_t key0 = keys.begin; key0 < keys.end; key0 += BLOCK_N) {
                step({q_tile.data(), kv.kt(key0), kv.v(key0), scores.data(), acc.data(), row_max.data(),
                      row_sum.data(), rows_padded, D, ld,
                      score_bias_of(a, seq, it.batch, it.head, it.row0, rows, key0, key_bias.data())});
            }
            tile_steps.fetch_add((keys.end - keys.begin + BLOCK_N - 1) / BLOCK_N, std::memory_order_relaxed);

            T* out_rows = out + offset_of(a, a.out_strides, it.batch, it.head, token);
            float* lse_rows = a.lse + offset_of(a, a.lse_strides, it.batch, it.head, token);
            const float sink = a.sinks ? a.sinks[it.head] : -kInf;
            for (int64_t r = 0; r < rows; ++r) {
                const float sum = row_sum[r], top_score = row_max[r];
                // sum >= 1 once any key is visible (the max contributes exp(0)); 0 means none is
                float scale = 0.0f, lse = sink;
                if (sum > 0.0f && !a.sinks) {
                    scale = 1.0f / sum;
                    lse = top_score + std::log(sum);
                } else if (sum > 0.0f) {
                    // the sink is one more term exp(sink) of the denominator, next to exp(top_score) * sum
                    scale = 1.0f / (sum + std::exp(sink - top_score));
                    const float top = std::max(top_score, sink);
                    lse = top + std::log(sum * std::exp(top_score - top) + std::exp(sink - top));
                }
                store_row<kType>(acc.data() + r * ld, D, scale, out_rows + r * a.out_strides.seq);
                lse_rows[r * a.lse_strides.seq] = lse;
            }
        }
    });
}

// The backward's work units are (sequence, kv head, key split): split s of `splits` owns key blocks
// s, s + splits, s + 2 splits, ... of its sequence, interleaved so that under a causal mask or a
// window every split gets as many long key columns (seen by many query rows) as short ones. A unit
// writes dK / dV of its key blocks and, for every query row of its heads, a partial dQ summed over
// its key blocks; the partials are summed afterwards in split order. The number of splits depends
// on the shape only, never on num_threads, so the gradients are the same bits on any thread count.
//
// Splits give at least kBackwardUnits units where the keys allow it: at most kMaxKeySplits, at
// least kMinKeyBlocksPerSplit key blocks each (a split loads the query tiles of every query block
// it serves, which fewer key blocks amortize worse), and partial dQ buffers of at most
// kMaxPartialBytes. One split (batch * heads_kv >= kBackwardUnits, or short keys) needs no buffer.
constexpr int64_t kBackwardUnits = 16;
constexpr int64_t kMaxKeySplits = 8;
constexpr int64_t kMinKeyBlocksPerSplit = 4;
constexpr int64_t kMaxPartialBytes = int64_t{64} << 20;

// dQ rows: dense [batch][heads_q][seqlen_q], varlen [heads_q][tokens]
int64_t query_rows_of(const AttentionArgs& a) { return (a.cu_seqlens ? 1 : a.batch) * a.heads_q * a.seqlen_q; }

int64_t key_splits_of(const AttentionArgs& a) {
    int64_t longest = 0;
    for (int64_t b = 0; b < a.batch; ++b) longest = std::max(longest, sequence_of(a, b).len_k);
    const int64_t heads = std::max<int64_t>(a.batch * a.heads_kv, 1);
    const int64_t wanted = (kBackwardUnits + heads - 1) / heads;
    const int64_t by_keys = (longest + BLOCK_N - 1) / BLOCK_N / kMinKeyBlocksPerSplit;
    const int64_t by_memory = kMaxPartialBytes / std::max<int64_t>(query_rows_of(a) * a.head_dim * 4, 1);
    return std::clamp<int64_t>(std::min({wanted, by_keys, by_memory}), 1, kMaxKeySplits);
}

std::atomic<int64_t> backward_units{0};

// The key blocks of one split of one kv head in fp32, in the layouts the backward's tile steps
// read; slot i holds key block split + i * splits. O(seqlen_k * head_dim / splits).
template <DType kType>
class KeySplitTiles {
   public:
    explicit KeySplitTiles(const AttentionArgs& a) : a_(a), ld_(round_up(a.head_dim, kPanelCols)) {}

    void load(int64_t b, const Sequence& seq, int64_t hk, int64_t split, int64_t splits) {
        using T = typename Elem<kType>::T;
        const int64_t D = a_.head_dim, blocks = (seq.len_k + BLOCK_N - 1) / BLOCK_N;
        slots_ = blocks > split ? (blocks - split + splits - 1) / splits : 0;
        kt_.resize(slots_ * BLOCK_N * D);
        k_.resize(slots_ * BLOCK_N * ld_);
        vt_.resize(slots_ * BLOCK_N * D);
        for (int64_t i = 0; i < slots_; ++i) {
            const int64_t key0 = (split + i * splits) * BLOCK_N, keys = std::min(BLOCK_N, seq.len_k - key0);
            const int64_t token = seq.first_k + key0;
            const T* k_rows = static_cast<const T*>(a_.k) + offset_of(a_, a_.k_strides, b, hk, token);
            const T* v_rows = static_cast<const T*>(a_.v) + offset_of(a_, a_.v_strides, b, hk, token);
            load_rows_transposed<kType>(k_rows, a_.k_strides.seq, keys, D, kt_.data() + i * BLOCK_N * D);
            load_rows<kType>(k_rows, a_.k_strides.seq, keys, BLOCK_N, D, ld_, 1.0f, k_.data() + i * BLOCK_N * ld_);
            load_rows_transposed<kType>(v_rows, a_.v_strides.seq, keys, D, vt_.data() + i * BLOCK_N * D);
        }
    }

    int64_t slots() const { return slots_; }
    const float* kt(int64_t slot) const { return kt_.data() + slot * BLOCK_N * a_.head_dim; }  // [head_dim][BLOCK_N]
    const float* k(int64_t slot) const { return k_.data() + slot * BLOCK_N * ld_; }            // [BLOCK_N][ld]
    const float* vt(int64_t slot) const { return vt_.data() + slot * BLOCK_N * a_.head_dim; }  // [head_dim][BLOCK_N]

   private:
    const AttentionArgs& a_;
    const int64_t ld_;
    int64_t slots_ = 0;
    std::vector<float> kt_, k_, vt_;
};

template <DType kType>
void backward(const AttentionArgs& a, const AttentionGrads& g, int num_threads) {
    using T = typename Elem<kType>::T;
    const T* q = static_cast<const T*>(a.q);
    const T* out = static_cast<const T*>(a.out);
    const T* dout = static_cast<const T*>(g.dout);
    T* dq = static_cast<T*>(g.dq);
    T* dk = static_cast<T*>(g.dk);
    T* dv = static_cast<T*>(g.dv);
    const int64_t D = a.head_dim, ld = round_up(D, kPanelCols), group = a.heads_q / a.heads_kv;
    const int64_t splits = key_splits_of(a);
    const int64_t units = a.batch * a.heads_kv * splits;
    const BackwardStep step = backward_step();
    // The layout of delta and, with several splits, of each split's partial dQ (fp32, unscaled),
    // summed below.
    const int64_t dq_rows = query_rows_of(a);
    const auto first_row_of = [&](int64_t b, int64_t h) {
        return (a.cu_seqlens ? h : b * a.heads_q + h) * a.seqlen_q + sequence_of(a, b).first_q;
    };
    // Kept for the calling thread's next call: a fresh buffer costs more in page faults than the
    // splits' sums (training calls the backward with the same shapes layer after layer).
    // (a reference: the workers must reach the calling thread's buffer, not their own)
    thread_local std::vector<float> partial_dq_of_thread;
    std::vector<float>& partial_dq = partial_dq_of_thread;
    if (splits > 1 && partial_dq.size() < static_cast<size_t>(splits * dq_rows * D)) partial_dq.resize(splits * dq_rows * D);
    // delta = rowsum(dO * out) - dlse once per row rather than once per split; and, per (b, h), the
    // sum over the rows of sequence b of exp(sink[h] - lse) * delta, summed over b below in a fixed order
    std::vector<float> delta_rows(dq_rows);
    std::vector<double> sink_terms(a.sinks ? a.batch * a.heads_q : 0, 0.0);
    const int64_t heads = a.batch * a.heads_q;
    parallel_for(heads, dq_rows / std::max<int64_t>(heads, 1) * D, num_threads, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t b = bh / a.heads_q, h = bh % a.heads_q;
            const Sequence seq = sequence_of(a, b);
            const T* out_rows = out + offset_of(a, a.out_strides, b, h, seq.first_q);
            const T* dout_rows = dout + offset_of(a, g.dout_strides, b, h, seq.first_q);
            const float* lse_rows = a.lse + offset_of(a, a.lse_strides, b, h, seq.first_q);
            const float* dlse_rows = g.dlse ? g.dlse + offset_of(a, g.dlse_strides, b, h, seq.first_q) : nullptr;
            float* delta = delta_rows.data() + first_row_of(b, h);
            double sink_term = 0.0;
            for (int64_t r = 0; r < seq.len_q; ++r) {
                // delta from the stored (rounded) out, as FlashAttention-2 does; a gradient into lse
                // enters here (d lse / d s_j = p_j)
                const T* o = out_rows + r * a.out_strides.seq;
                const T* d_o = dout_rows + r * g.dout_strides.seq;
                float dot = 0.0f;
                for (int64_t i = 0; i < D; ++i) dot += Elem<kType>::load(d_o[i]) * Elem<kType>::load(o[i]);
                if (dlse_rows) dot -= dlse_rows[r * g.dlse_strides.seq];
                const float row_lse = lse_rows[r * a.lse_strides.seq];
                if (a.sinks && row_lse != -kInf) sink_term += std::exp(static_cast<double>(a.sinks[h]) - row_lse) * dot;
                delta[r] = dot;
            }
            if (a.sinks) sink_terms[bh] = sink_term;
        }
    });

    const int64_t work = group * std::max<int64_t>(a.seqlen_q, 1) * std::max<int64_t>(a.seqlen_k, 1) * D / splits;
    for_each_item(units, work, num_threads, [&](const auto& next_item) {
        KeySplitTiles<kType> kv(a);
        std::vector<float> q_tile(BLOCK_M * ld), dout_tile(BLOCK_M * ld), lse(BLOCK_M), delta(BLOCK_M),
            probs(BLOCK_M * BLOCK_N), dscores(BLOCK_M * BLOCK_N), dq_acc(BLOCK_M * ld), key_bias(BLOCK_N),
            softcap_grad(a.softcap > 0.0f ? BLOCK_M * BLOCK_N : 0), dk_acc, dv_acc;
        for (int64_t unit = next_item(); unit >= 0; unit = next_item()) {
            const int64_t split = unit % splits, hk = unit / splits % a.heads_kv, b = unit / splits / a.heads_kv;
            const Sequence seq = sequence_of(a, b);
            kv.load(b, seq, hk, split, splits);
            // dK / dV of this split's key blocks in fp32, summed over the group's query heads
            dk_acc.assign(kv.slots() * BLOCK_N * ld, 0.0f);
            dv_acc.assign(kv.slots() * BLOCK_N * ld, 0.0f);

            for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
                for (int64_t row0 = 0; row0 < seq.len_q; row0 += BLOCK_M) {
                    const int64_t rows = std::min(BLOCK_M, seq.len_q - row0), rows_padded = round_up(rows, kPanelRows);
                    const int64_t token = seq.first_q + row0;
                    const KeyRange keys = key_range_of(a, seq, row0, rows);
                    // this split's first key block in the range
                    const int64_t first_block = keys.begin / BLOCK_N;
                    const int64_t first_key0 = (first_block + (split - first_block % splits + splits) % splits) * BLOCK_N;
                    const bool has_keys = first_key0 < keys.end;
                    std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
                    if (has_keys) {
                        load_rows<kType>(q + offset_of(a, a.q_strides, b, h, token), a.q_strides.seq, rows,
                                         rows_padded, D, ld, a.softmax_scale, q_tile.data());
                        load_rows<kType>(dout + offset_of(a, g.dout_strides, b, h, token), g.dout_strides.seq, rows,
                                         rows_padded, D, ld, 1.0f, dout_tile.data());
                        const float* lse_rows = a.lse + offset_of(a, a.lse_strides, b, h, token);
                        const float* delta_of_rows = delta_rows.data() + first_row_of(b, h) + row0;
                        bool any_key = false;
                        for (int64_t r = 0; r < rows_padded; ++r) {
                            const float row_lse = r < rows ? lse_rows[r * a.lse_strides.seq] : -kInf;
                            any_key |= row_lse != -kInf;
                            lse[r] = row_lse == -kInf ? kInf : row_lse;
                            delta[r] = r < rows ? delta_of_rows[r] : 0.0f;
                        }
                        int64_t steps = 0;
                        for (int64_t key0 = first_key0; any_key && key0 < keys.end; key0 += splits * BLOCK_N, ++steps) {
                            const int64_t slot = key0 / BLOCK_N / splits;
                            step({q_tile.data(), dout_tile.data(), lse.data(), delta.data(), kv.k(slot), kv.kt(slot),
                                  kv.vt(slot), probs.data(), dscores.data(), dq_acc.data(),
                                  dk_acc.data() + slot * BLOCK_N * ld, dv_acc.data() + slot * BLOCK_N * ld,
                                  a.softcap > 0.0f ? softcap_grad.data() : nullptr, rows_padded, D, ld,
                                  score_bias_of(a, seq, b, h, row0, rows, key0, key_bias.data())});
                        }
                        tile_steps.fetch_add(steps, std::memory_order_relaxed);
                    }
                    if (splits == 1) {
                        T* dq_out = dq + offset_of(a, g.dq_strides, b, h, token);
                        for (int64_t r = 0; r < rows; ++r)
                            store_row<kType>(dq_acc.data() + r * ld, D, a.softmax_scale, dq_out + r * g.dq_strides.seq);
                    } else {
                        float* partial = partial_dq.data() + (split * dq_rows + first_row_of(b, h) + row0) * D;
                        for (int64_t r = 0; r < rows; ++r)
                            std::copy(dq_acc.data() + r * ld, dq_acc.data() + r * ld + D, partial + r * D);
                    }
                }
            }
            for (int64_t i = 0; i < kv.slots(); ++i) {
                const int64_t key0 = (split + i * splits) * BLOCK_N, keys = std::min(BLOCK_N, seq.len_k - key0);
                for (int64_t n = 0; n < keys; ++n) {
                    const int64_t token = seq.first_k + key0 + n;
                    const float* dk_row = dk_acc.data() + (i * BLOCK_N + n) * ld;
                    const float* dv_row = dv_acc.data() + (i * BLOCK_N + n) * ld;
                    store_row<kType>(dk_row, D, 1.0f, dk + offset_of(a, g.dk_strides, b, hk, token));
                    store_row<kType>(dv_row, D, 1.0f, dv + offset_of(a, g.dv_strides, b, hk, token));
                }
            }
            backward_units.fetch_add(1, std::memory_order_relaxed);
        }
    });
    if (splits > 1) {
        // dQ = softmax_scale * (the splits' partials summed in split order)
        parallel_for(dq_rows, splits * D, num_threads, [&](int64_t begin, int64_t end) {
            std::vector<float> sum(D);
            for (int64_t row = begin; row < end; ++row) {
                const float* partial = partial_dq.data() + row * D;
                std::copy(partial, partial + D, sum.begin());
                for (int64_t s = 1; s < splits; ++s)
                    for (int64_t i = 0; i < D; ++i) sum[i] += partial[s * dq_rows * D + i];
                const int64_t token = row % a.seqlen_q, h = row / a.seqlen_q % a.heads_q;
                const int64_t b = a.cu_seqlens ? 0 : row / a.seqlen_q / a.heads_q;
                store_row<kType>(sum.data(), D, a.softmax_scale, dq + offset_of(a, g.dq_strides, b, h, token));
            }
        });
    }
    if (a.sinks) {
        // d lse / d sink = exp(sink - lse), so dsink = -sum over rows of exp(sink - lse) * delta
        for (int64_t h = 0; h < a.heads_q; ++h) {
            double total = 0.0;
            for (int64_t b = 0; b < a.batch; ++b) total += sink_terms[b * a.heads_q + h];
            g.dsinks[h] = static_cast<float>(-total);
        }
    }
}

}  // namespace

void flash_attention_fwd_cpu(const AttentionArgs& args, int num_threads) {
    check_args(args);
    switch (args.dtype) {
        case DType::F32: return forward<DType::F32>(args, num_threads);
        case DType::F16: return forward<DType::F16>(args, num_threads);
        case DType::BF16: return forward<DType::BF16>(args, num_threads);
    }
    throw std::invalid_argument("flash_attention_fwd_cpu: unknown dtype");
}

void flash_attention_bwd_cpu(const AttentionArgs& args, const AttentionGrads& grads, int num_threads) {
    check_args(args);
    if (args.sinks && !grads.dsinks) throw std::invalid_argument("flash_attention_bwd_cpu: sinks need a dsinks output");
    switch (args.dtype) {
        case DType::F32: return backward<DType::F32>(args, grads, num_threads);
        case DType::F16: return backward<DType::F16>(args, grads, num_threads);
        case DType::BF16: return backward<DType::BF16>(args, grads, num_threads);
    }
    throw std::invalid_argument("flash_attention_bwd_cpu: unknown dtype");
}

int64_t flash_attention_cpu_tile_steps() { return tile_steps.load(std::memory_order_relaxed); }

int64_t flash_attention_cpu_backward_units() { return backward_units.load(std::memory_order_relaxed); }

}  // namespace qk
