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

// exp(x) for x <= 0, branch-free so that the row loops vectorize (std::exp does not): 2^n * p(r)
// with n = round(x / ln 2), r = x - n ln 2 split in two constants (Cody-Waite), p the degree-6
// Taylor polynomial (relative error < 2e-7 on |r| <= ln2 / 2). Below -87.3 (2^-126) it flushes to 0.
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.3f);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, sizeof(bits));
    bits += static_cast<int32_t>(n) * (1 << 23);
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

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
    float m = -std::numeric_limits<float>::infinity();
    float sum_z = 0.0f;
    for (int64_t j = 0; j < vocab; ++j) {
        m = std::max(m, z[j]);
        sum_z += z[j];
    }
    float s = 0.0f;
    if (std::isfinite(m)) {
        for (int64_t j = 0; j < vocab; ++j) s += exp_nonpositive(z[j] - m);
    } else {
        // +inf or NaN somewhere (or every logit -inf): let exp / log propagate it as torch does
        for (int64_t j = 0; j < vocab; ++j) s += std::exp(z[j] - m);
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
