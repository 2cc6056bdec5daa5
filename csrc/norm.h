// Native RMSNorm (python/qlora_kernels/reference/norm.py): per row of x [rows, H],
// rstd = 1 / sqrt(mean(x^2) + eps) and n = x * rstd in fp32, then
//   cast_before_weight (Llama): y = round_y(round_x(n) * (weight + offset))
//   otherwise (Gemma):          y = round_y(n * (weight + offset))
// with every product and sum in fp32. No torch headers: raw pointers, sizes, dtype tags.
#pragma once

#include <cstdint>

#include "nf4.h"

namespace qk {

// x: rows of H elements, row r at x + r * x_row_stride (elements, >= 0: rows may overlap; unit
// stride along H), x_dtype.
// weight [H] (w_dtype). y [rows, H] contiguous (y_dtype); rstd [rows] fp32. Multithreaded over rows.
void rms_norm_fwd_cpu(const void* x, DType x_dtype, int64_t x_row_stride, const void* weight, DType w_dtype,
                      int64_t rows, int64_t H, float eps, float offset, bool cast_before_weight, void* y,
                      DType y_dtype, float* rstd, int num_threads);

// Backward of rms_norm_fwd_cpu in one pass over dy and x:
//   g = dy * (weight + offset), dx = rstd * (g - n * mean(g * n))    (dx [rows, H] contiguous, x_dtype)
//   dweight[h] = sum over rows of dy * n (n rounded to x_dtype when cast_before_weight), into fp32
// dweight [H] unless it is null. dy [rows, H] contiguous (dy_dtype). Rows are cut into blocks whose
// number depends on `rows` only; each block sums its rows' dweight terms in fp32 and the blocks' sums
// are added in block order: the result does not depend on the thread count or on scheduling.
void rms_norm_bwd_cpu(const void* dy, DType dy_dtype, const void* x, DType x_dtype, int64_t x_row_stride,
                      const void* weight, DType w_dtype, const float* rstd, int64_t rows, int64_t H, float offset,
                      bool cast_before_weight, void* dx, float* dweight, int num_threads);

}  // namespace qk
