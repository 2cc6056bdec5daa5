// pybind11 bindings of the cross-entropy kernel (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "binding_utils.h"
#include "cross_entropy.h"

namespace py = pybind11;

using qk::binding::ptr;

void bind_loss(py::module_& m) {
    using py::arg;
    m.def(
        "cross_entropy_rows_cpu",
        [](uintptr_t logits, int64_t row_stride, uintptr_t labels, uintptr_t loss, int64_t rows, int64_t vocab,
           int64_t ignore_index, float label_smoothing, float softcap, float scale, bool compute_grad, int threads) {
            qk::cross_entropy_rows_cpu(ptr<float>(logits), row_stride, ptr<const int64_t>(labels), ptr<float>(loss),
                                       rows, vocab, ignore_index, label_smoothing, softcap, scale, compute_grad,
                                       threads);
        },
        "Loss of each row of fp32 logits and, with compute_grad, its gradient in place of the logits; see "
        "cross_entropy.h.",
        arg("logits"), arg("row_stride"), arg("labels"), arg("loss"), arg("rows"), arg("vocab"), arg("ignore_index"),
        arg("label_smoothing"), arg("softcap"), arg("scale"), arg("compute_grad"), arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
}
