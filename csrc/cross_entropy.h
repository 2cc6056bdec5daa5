// Row-wise cross-entropy of the fused linear + cross-entropy op (python/qlora_kernels/ops/loss.py,
// meaning in reference/loss.py cross_entropy_rows). No torch headers: raw pointers and sizes.
#pragma once

#include <cstdint>

namespace qk {

// logits: fp32 [rows, vocab], row r at logits + r * row_stride (vocab contiguous); labels: int64
// [rows]; loss: fp32 [rows]. For each row, with z = softcap * tanh(x / softcap) (z = x when
// softcap is 0) and lse = log(sum_j exp(z_j)):
//   loss[r] = lse - (1 - label_smoothing) * z[label] - label_smoothing / vocab * sum_j z_j,
// 0 when labels[r] == ignore_index. With compute_grad the row is overwritten by
//   scale * (exp(z_j - lse) - label_smoothing / vocab - (1 - label_smoothing) * [j == label])
//         * (softcap ? 1 - (z_j / softcap)^2 : 1),
// zeros for an ignored row. fp32 math, max-subtracted (two passes over the row, a third writes
// the gradient). Labels must lie in [0, vocab) or equal ignore_index (the caller checks; a label
// out of range throws std::out_of_range here rather than read out of bounds). Multithreaded over
// rows.
void cross_entropy_rows_cpu(float* logits, int64_t row_stride, const int64_t* labels, float* loss, int64_t rows,
                            int64_t vocab, int64_t ignore_index, float label_smoothing, float softcap, float scale,
                            bool compute_grad, int num_threads);

}  // namespace qk
