// CPU RMSNorm forward and backward (see norm.h). Memory-bound: each row is read once into an
// fp32 buffer, its statistic taken with eight independent partial sums (vectorizable without
// reassociating), and written once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "float_convert.h"
#include "norm.h"
#include "parallel.h"

namespace qk {
namespace {

constexpr int kLanes = 8;
// Most row blocks the backward sums dweight over (each holds H fp32 partial sums), and the fewest
// rows per block: blocks enough to share among threads, partials small next to x.
constexpr int64_t kMaxWeightBlocks = 64;
constexpr int64_t kMinRowsPerWeightBlock = 8;

void load_row(const void* src, DType dtype, int64_t offset, int64_t H, float* out) {
    switch (dtype) {
        case DType::F32:
            std::memcpy(out, static_cast<const float*>(src) + offset, sizeof(float) * H);
            return;
        case DType::F16: {
            const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
            for (int64_t i = 0; i < H; ++i) out[i] = fp16_to_float(p[i]);
            return;
        }
        case DType::BF16: {
            const uint16_t* p = static_cast<const uint16_t*>(src) + offset;
            for (int64_t i = 0; i < H; ++i) out[i] = bf16_to_float(p[i]);
            return;
        }
    }
}

void store_row(const float* row, DType dtype, int64_t offset, int64_t H, void* dst) {
    switch (dtype) {
        case DType::F32:
            std::memcpy(static_cast<float*>(dst) + offset, row, sizeof(float) * H);
            return;
        case DType::F16: {
            uint16_t* p = static_cast<uint16_t*>(dst) + offset;
            for (int64_t i = 0; i < H; ++i) p[i] = float_to_fp16(row[i]);
            return;
        }
        case DType::BF16: {
            uint16_t* p = static_cast<uint16_t*>(dst) + offset;
            for (int64_t i = 0; i < H; ++i) p[i] = float_to_bf16(row[i]);
            return;
        }
    }
}

// v rounded to `dtype` and back (the Llama mode's cast of n to x's dtype)
void round_row(float* row, DType dtype, int64_t H) {
    if (dtype == DType::F16) {
        for (int64_t i = 0; i < H; ++i) row[i] = fp16_to_float(float_to_fp16(row[i]));
    } else if (dtype == DType::BF16) {
        for (int64_t i = 0; i < H; ++i) row[i] = bf16_to_float(float_to_bf16(row[i]));
    }
}

float dot(const float* a, const float* b, int64_t H) {
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= H; i += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < H; ++i, ++l) acc[l] += a[i] * b[i];
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    return s;
}

float row_rstd(const float* xf, int64_t H, float eps) {
    const float mean = dot(xf, xf, H) / static_cast<float>(H);
    return 1.0f / std::sqrt(mean + eps);
}

// weight + offset in fp32: what multiplies each normalized row
std::vector<float> scale_of(const void* weight, DType w_dtype, int64_t H, float offset) {
    std::vector<float> scale(static_cast<size_t>(H));
    load_row(weight, w_dtype, 0, H, scale.data());
    if (offset != 0.0f)
        for (float& s : scale) s += offset;
    return scale;
}

void check_sizes(int64_t rows, int64_t H, int64_t x_row_stride) {
    // rows may overlap (an expanded x has row stride 0): they are only read
    if (rows < 0 || H < 1 || x_row_stride < 0)
        throw std::invalid_argument("rms_norm: bad sizes rows=" + std::to_string(rows) + " H=" + std::to_string(H) +
                                    " x_row_stride=" + std::to_string(x_row_stride));
}

}  // namespace

void rms_norm_fwd_cpu(const void* x, DType x_dtype, int64_t x_row_stride, const void* weight, DType w_dtype,
                      int64_t rows, int64_t H, float eps, float offset, bool cast_before_weight, void* y,
                      DType y_dtype, float* rstd, int num_threads) {
    check_sizes(rows, H, x_row_stride);
    const std::vector<float> scale = scale_of(weight, w_dtype, H, offset);
    parallel_for(rows, 2 * H, num_threads, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(static_cast<size_t>(H));
        float* row = buf.data();
        for (int64_t r = begin; r < end; ++r) {
            load_row(x, x_dtype, r * x_row_stride, H, row);
            const float rs = row_rstd(row, H, eps);
            rstd[r] = rs;
            for (int64_t i = 0; i < H; ++i) row[i] *= rs;
            if (cast_before_weight) round_row(row, x_dtype, H);
            for (int64_t i = 0; i < H; ++i) row[i] *= scale[i];
            store_row(row, y_dtype, r * H, H, y);
        }
    });
}

void rms_norm_bwd_cpu(const void* dy, DType dy_dtype, const void* x, DType x_dtype, int64_t x_row_stride,
                      const void* weight, DType w_dtype, const float* rstd, int64_t rows, int64_t H, float offset,
                      bool cast_before_weight, void* dx, float* dweight, int num_threads) {
    check_sizes(rows, H, x_row_stride);
    const std::vector<float> scale = scale_of(weight, w_dtype, H, offset);
    const float inv_h = 1.0f / static_cast<float>(H);
    // the row blocks depend on `rows` only, so dweight's summation order does too
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>(kMaxWeightBlocks, rows / kMinRowsPerWeightBlock));
    const int64_t rows_per_block = rows == 0 ? 0 : (rows + blocks - 1) / blocks;
    std::vector<float> partial(dweight ? static_cast<size_t>(blocks * H) : 0, 0.0f);
    parallel_for(blocks, std::max<int64_t>(1, rows_per_block) * 3 * H, num_threads, [&](int64_t b0, int64_t b1) {
        std::vector<float> buf(static_cast<size_t>(3 * H));
        float* xr = buf.data();
        float* g = xr + H;
        float* nw = g + H;
        for (int64_t b = b0; b < b1; ++b) {
            float* acc = dweight ? partial.data() + b * H : nullptr;
            const int64_t end = std::min(rows, (b + 1) * rows_per_block);
            for (int64_t r = b * rows_per_block; r < end; ++r) {
                const float rs = rstd[r];
                load_row(x, x_dtype, r * x_row_stride, H, xr);
                load_row(dy, dy_dtype, r * H, H, g);  // dy, then g in place
                for (int64_t i = 0; i < H; ++i) xr[i] *= rs;  // n
                if (acc) {
                    std::memcpy(nw, xr, sizeof(float) * H);
                    if (cast_before_weight) round_row(nw, x_dtype, H);
                    for (int64_t i = 0; i < H; ++i) acc[i] += g[i] * nw[i];
                }
                for (int64_t i = 0; i < H; ++i) g[i] *= scale[i];
                const float c = dot(g, xr, H) * inv_h;
                for (int64_t i = 0; i < H; ++i) g[i] = rs * (g[i] - xr[i] * c);
                store_row(g, x_dtype, r * H, H, dx);
            }
        }
    });
    if (!dweight) return;
    parallel_for(H, blocks, num_threads, [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) {
            float s = 0.0f;
            for (int64_t b = 0; b < blocks; ++b) s += partial[b * H + h];
            dweight[h] = s;
        }
    });
}

}  // namespace qk
