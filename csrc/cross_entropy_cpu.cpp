// Row-wise cross-entropy on the CPU (contract in cross_entropy.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "cross_entropy.h"
#include "parallel.h"

namespace qk {
namespace {

// exp(x) for x <= 0, written so that the row loops vectorize on baseline x86-64 (std::exp does
// not, nor nearbyint, nor a float compare under -ftrapping-math): 2^n * p(r) with
// n = round(x / ln 2) by the 1.5 * 2^23 trick (n read back from the sum's low bits), r = x - n ln 2
// split in two constants (Cody-Waite), p the degree-6 Taylor polynomial (relative error < 2e-7 on
// |r| <= ln2 / 2). x below -87.3 (exp < 2^-126) is clamped there, on the bits: a negative float's
// bits grow with its magnitude.
inline float exp_nonpositive(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    u = u > 0xC2AE999Au ? 0xC2AE999Au : u;  // -87.3f
    std::memcpy(&x, &u, sizeof(x));
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = x * 1.44269504088896341f + shifter;
    const float n = t - shifter;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t t_bits, shifter_bits, bits;
    std::memcpy(&t_bits, &t, sizeof(t_bits));
    std::memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
    std::memcpy(&bits, &p, sizeof(bits));
    bits += (t_bits - shifter_bits) * (1 << 23);
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

// Independent partial sums / maxima per lane: the compiler may not reorder one float sum (it is
// not associative) but vectorizes these lanes.
constexpr int64_t kLanes = 16;

struct RowStats {
    float max;
    float lse;
    float sum_z;
};

// z = softcap * tanh(x / softcap) written over the row (the gradient pass needs z anyway).
void softcap_row(float* x, int64_t vocab, float softcap) {
    const float inv = 1.0f / softcap;
    for (int64_t j = 0; j < vocab; ++j) x[j] = softcap * std::tanh(x[j] * inv);
}

RowStats row_stats(const float* z, int64_t vocab) {
    const int64_t body = vocab - vocab % kLanes;
    // the max on order-preserving integer keys (a float compare does not vectorize under
    // -ftrapping-math): key(f) = bits(f), with the magnitude bits flipped for negative f
    int32_t max_key[kLanes];
    float sum_lane[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) {
        max_key[k] = std::numeric_limits<int32_t>::min();
        sum_lane[k] = 0.0f;
    }
    bool nan = false;
    for (int64_t j = 0; j < body; j += kLanes) {
        for (int64_t k = 0; k < kLanes; ++k) {
            const float v = z[j + k];
            int32_t key;
            std::memcpy(&key, &v, sizeof(key));
            key ^= (key >> 31) & 0x7FFFFFFF;
            max_key[k] = key > max_key[k] ? key : max_key[k];
            sum_lane[k] += v;
        }
    }
    float m = -std::numeric_limits<float>::infinity(), sum_z = 0.0f;
    for (int64_t k = 0; k < kLanes; ++k) {
        int32_t key = max_key[k];
        key ^= (key >> 31) & 0x7FFFFFFF;
        float v;
        std::memcpy(&v, &key, sizeof(v));
        if (max_key[k] != std::numeric_limits<int32_t>::min()) m = std::max(m, v);
        sum_z += sum_lane[k];
    }
    for (int64_t j = body; j < vocab; ++j) {
        m = std::max(m, z[j]);
        sum_z += z[j];
    }
    // the max above skips NaN; a NaN logit makes the sum NaN, and then the row's loss
    nan = std::isnan(sum_z);
    float s = 0.0f;
    if (std::isfinite(m) && !nan) {
        for (int64_t k = 0; k < kLanes; ++k) sum_lane[k] = 0.0f;
        for (int64_t j = 0; j < body; j += kLanes) {
            for (int64_t k = 0; k < kLanes; ++k) sum_lane[k] += exp_nonpositive(z[j + k] - m);
        }
        for (int64_t k = 0; k < kLanes; ++k) s += sum_lane[k];
        for (int64_t j = body; j < vocab; ++j) s += exp_nonpositive(z[j] - m);
    } else {
        // +inf or NaN somewhere (or every logit -inf): let exp / log propagate it as torch does
        for (int64_t j = 0; j < vocab; ++j) s += std::exp(z[j] - m);
        if (nan) s = std::numeric_limits<float>::quiet_NaN();
    }
    return {m, m + std::log(s), sum_z};
}

}  // namespace

void cross_entropy_rows_cpu(float* logits, int64_t row_stride, const int64_t* labels, float* loss, int64_t rows,
                            int64_t vocab, int64_t ignore_index, float label_smoothing, float softcap, float scale,
                            bool compute_grad, int num_threads) {
    if (rows < 0 || vocab <= 0 || row_stride < vocab)
        throw std::invalid_argument("cross_entropy_rows_cpu: need rows >= 0, vocab > 0, row_stride >= vocab");
    for (int64_t r = 0; r < rows; ++r) {
        if (labels[r] != ignore_index && (labels[r] < 0 || labels[r] >= vocab))
            throw std::out_of_range("cross_entropy_rows_cpu: label " + std::to_string(labels[r]) + " at row " +
                                    std::to_string(r) + " is outside [0, " + std::to_string(vocab) + ")");
    }
    const float smooth_each = label_smoothing / static_cast<float>(vocab);
    const float target_weight = 1.0f - label_smoothing;
    parallel_for(rows, 4 * vocab, num_threads, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            float* x = logits + r * row_stride;
            const int64_t label = labels[r];
            if (label == ignore_index) {
                loss[r] = 0.0f;
                if (compute_grad) std::fill(x, x + vocab, 0.0f);
                continue;
            }
            float* z = x;
            if (softcap != 0.0f) {
                if (compute_grad) {
                    softcap_row(x, vocab, softcap);
                } else {
                    // loss only: the logits stay as they were; z from a copy would cost a row
                    // buffer, so the two reading passes recompute tanh instead
                    const float inv = 1.0f / softcap;
                    float m = -std::numeric_limits<float>::infinity(), sum_z = 0.0f;
                    for (int64_t j = 0; j < vocab; ++j) {
                        const float zj = softcap * std::tanh(x[j] * inv);
                        m = std::max(m, zj);
                        sum_z += zj;
                    }
                    float s = 0.0f;
                    for (int64_t j = 0; j < vocab; ++j) s += std::exp(softcap * std::tanh(x[j] * inv) - m);
                    const float lse = m + std::log(s);
                    const float z_label = softcap * std::tanh(x[label] * inv);
                    loss[r] = lse - target_weight * z_label - smooth_each * sum_z;
                    continue;
                }
            }
            const RowStats st = row_stats(z, vocab);
            loss[r] = st.lse - target_weight * z[label] - smooth_each * st.sum_z;
            if (!compute_grad) continue;
            const float lse = st.lse;
            // z_j - lse <= 0 always; a non-finite lse (inf / NaN logits) takes std::exp, which
            // propagates it as torch does
            const bool finite = std::isfinite(lse);
            if (softcap != 0.0f) {
                const float inv = 1.0f / softcap;
                const float t_label = z[label] * inv;
                for (int64_t j = 0; j < vocab; ++j) {
                    const float t = z[j] * inv;
                    const float p = finite ? exp_nonpositive(z[j] - lse) : std::exp(z[j] - lse);
                    z[j] = scale * (p - smooth_each) * (1.0f - t * t);
                }
                z[label] -= scale * target_weight * (1.0f - t_label * t_label);
            } else {
                if (finite) {
                    for (int64_t j = 0; j < vocab; ++j) z[j] = scale * (exp_nonpositive(z[j] - lse) - smooth_each);
                } else {
                    for (int64_t j = 0; j < vocab; ++j) z[j] = scale * (std::exp(z[j] - lse) - smooth_each);
                }
                z[label] -= scale * target_weight;
            }
        }
    });
}

}  // namespace qk
