// pybind11 bindings of the RMSNorm kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "binding_utils.h"
#include "norm.h"

namespace py = pybind11;

using qk::binding::dtype_tag;
using qk::binding::ptr;

void bind_norm(py::module_& m) {
    using py::arg;
    const auto release = py::call_guard<py::gil_scoped_release>();

    m.def(
        "rms_norm_fwd_cpu",
        [](uintptr_t x, int x_dtype, int64_t x_row_stride, uintptr_t weight, int w_dtype, int64_t rows, int64_t H,
           float eps, float offset, bool cast_before_weight, uintptr_t y, int y_dtype, uintptr_t rstd, int threads) {
            qk::rms_norm_fwd_cpu(ptr<const void>(x), dtype_tag(x_dtype), x_row_stride, ptr<const void>(weight),
                                 dtype_tag(w_dtype), rows, H, eps, offset, cast_before_weight, ptr<void>(y),
                                 dtype_tag(y_dtype), ptr<float>(rstd), threads);
        },
        "RMSNorm forward of rows x [rows, H] (row stride x_row_stride): y [rows, H] contiguous, rstd [rows] fp32.",
        arg("x"), arg("x_dtype"), arg("x_row_stride"), arg("weight"), arg("w_dtype"), arg("rows"), arg("H"),
        arg("eps"), arg("offset"), arg("cast_before_weight"), arg("y"), arg("y_dtype"), arg("rstd"),
        arg("num_threads"), release);
    m.def(
        "rms_norm_bwd_cpu",
        [](uintptr_t dy, int dy_dtype, uintptr_t x, int x_dtype, int64_t x_row_stride, uintptr_t weight, int w_dtype,
           uintptr_t rstd, int64_t rows, int64_t H, float offset, bool cast_before_weight, uintptr_t dx,
           uintptr_t dweight, int threads) {
            qk::rms_norm_bwd_cpu(ptr<const void>(dy), dtype_tag(dy_dtype), ptr<const void>(x), dtype_tag(x_dtype),
                                 x_row_stride, ptr<const void>(weight), dtype_tag(w_dtype), ptr<const float>(rstd),
                                 rows, H, offset, cast_before_weight, ptr<void>(dx), ptr<float>(dweight), threads);
        },
        "RMSNorm backward: dx [rows, H] contiguous (x's dtype) and, unless dweight is 0, dweight [H] fp32.",
        arg("dy"), arg("dy_dtype"), arg("x"), arg("x_dtype"), arg("x_row_stride"), arg("weight"), arg("w_dtype"),
        arg("rstd"), arg("rows"), arg("H"), arg("offset"), arg("cast_before_weight"), arg("dx"), arg("dweight"),
        arg("num_threads"), release);
}
