// pybind11 bindings of the SwiGLU kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "binding_utils.h"
#include "swiglu.h"

namespace py = pybind11;

using qk::binding::dtype_tag;
using qk::binding::ptr;

namespace {

qk::Activation activation_tag(int tag) {
    if (tag != 0 && tag != 1) throw std::invalid_argument("activation tag must be 0 (silu) or 1 (gelu_tanh)");
    return static_cast<qk::Activation>(tag);
}

}  // namespace

void bind_swiglu(py::module_& m) {
    using py::arg;
    const auto release = py::call_guard<py::gil_scoped_release>();

    m.def(
        "swiglu_fwd_cpu",
        [](uintptr_t gate, int64_t gate_stride, uintptr_t up, int64_t up_stride, uintptr_t out, int64_t out_stride,
           int64_t rows, int64_t cols, int dtype, int activation, int threads) {
            qk::swiglu_fwd_cpu(ptr<const void>(gate), gate_stride, ptr<const void>(up), up_stride, ptr<void>(out),
                               out_stride, rows, cols, dtype_tag(dtype), activation_tag(activation), threads);
        },
        "out = act(gate) * up over rows x cols; row strides in elements.", arg("gate"), arg("gate_stride"),
        arg("up"), arg("up_stride"), arg("out"), arg("out_stride"), arg("rows"), arg("cols"), arg("dtype"),
        arg("activation"), arg("num_threads"), release);
    m.def(
        "swiglu_bwd_cpu",
        [](uintptr_t dout, int64_t dout_stride, uintptr_t gate, int64_t gate_stride, uintptr_t up, int64_t up_stride,
           uintptr_t dgate, int64_t dgate_stride, uintptr_t dup, int64_t dup_stride, int64_t rows, int64_t cols,
           int dtype, int activation, int threads) {
            qk::swiglu_bwd_cpu(ptr<const void>(dout), dout_stride, ptr<const void>(gate), gate_stride,
                               ptr<const void>(up), up_stride, ptr<void>(dgate), dgate_stride, ptr<void>(dup),
                               dup_stride, rows, cols, dtype_tag(dtype), activation_tag(activation), threads);
        },
        "dgate = dout * up * act'(gate), dup = dout * act(gate); row strides in elements.", arg("dout"),
        arg("dout_stride"), arg("gate"), arg("gate_stride"), arg("up"), arg("up_stride"), arg("dgate"),
        arg("dgate_stride"), arg("dup"), arg("dup_stride"), arg("rows"), arg("cols"), arg("dtype"),
        arg("activation"), arg("num_threads"), release);
}
