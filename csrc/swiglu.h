// SwiGLU, the gated MLP activation: out = act(gate) * up (python/qlora_kernels/reference/swiglu.py).
// No torch headers: raw pointers, sizes, a dtype tag.
//
// Layout: `rows` rows of `cols` contiguous elements; row r of a tensor starts at
// base + r * row_stride (elements), so one half of a wider tensor (Phi-3's gate_up) is read and
// written in place. All tensors share `dtype`; every computation is fp32. As in transformers,
// act(gate) is rounded to the dtype before the product, and the backward's d_up uses that
// rounded value (the factor the forward multiplied by).
#pragma once

#include <cstdint>

#include "nf4.h"

namespace qk {

enum class Activation : int32_t { Silu = 0, GeluTanh = 1 };

// out = act(gate) * up
void swiglu_fwd_cpu(const void* gate, int64_t gate_stride, const void* up, int64_t up_stride, void* out,
                    int64_t out_stride, int64_t rows, int64_t cols, DType dtype, Activation activation,
                    int num_threads);

// dgate = dout * up * act'(gate), dup = dout * act(gate), act recomputed in fp32
void swiglu_bwd_cpu(const void* dout, int64_t dout_stride, const void* gate, int64_t gate_stride, const void* up,
                    int64_t up_stride, void* dgate, int64_t dgate_stride, void* dup, int64_t dup_stride, int64_t rows,
                    int64_t cols, DType dtype, Activation activation, int num_threads);

}  // namespace qk
