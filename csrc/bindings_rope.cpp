// pybind11 bindings of the rotary-embedding kernel (see bindings.cpp for the conventions).
// q / k strides are (batch, head, seq) element strides, cos / sin ones (batch, seq); the
// head_dim / rotary_dim stride must be 1.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "binding_utils.h"
#include "rope.h"

namespace py = pybind11;

using qk::binding::ptr;

namespace {

using Strides3 = std::array<int64_t, 3>;
using Strides2 = std::array<int64_t, 2>;

qk::RopeStrides strides_of(const Strides3& s) { return {s[0], s[1], s[2]}; }

}  // namespace

void bind_rope(py::module_& m) {
    using py::arg;
    m.def(
        "rope_cpu",
        [](uintptr_t q, Strides3 q_strides, uintptr_t k, Strides3 k_strides, uintptr_t q_out, Strides3 q_out_strides,
           uintptr_t k_out, Strides3 k_out_strides, uintptr_t cos, Strides2 cos_strides, uintptr_t sin,
           Strides2 sin_strides, int dtype, int cos_dtype, int64_t batch, int64_t heads_q, int64_t heads_k,
           int64_t seqlen, int64_t head_dim, int64_t rotary_dim, bool backward, int num_threads) {
            qk::RopeArgs a;
            a.q = ptr<const void>(q);
            a.k = ptr<const void>(k);
            a.q_out = ptr<void>(q_out);
            a.k_out = ptr<void>(k_out);
            a.cos = ptr<const void>(cos);
            a.sin = ptr<const void>(sin);
            a.q_strides = strides_of(q_strides);
            a.k_strides = strides_of(k_strides);
            a.q_out_strides = strides_of(q_out_strides);
            a.k_out_strides = strides_of(k_out_strides);
            a.cos_batch_stride = cos_strides[0];
            a.cos_seq_stride = cos_strides[1];
            a.sin_batch_stride = sin_strides[0];
            a.sin_seq_stride = sin_strides[1];
            a.dtype = qk::binding::dtype_tag(dtype);
            a.cos_dtype = qk::binding::dtype_tag(cos_dtype);
            a.batch = batch;
            a.heads_q = heads_q;
            a.heads_k = heads_k;
            a.seqlen = seqlen;
            a.head_dim = head_dim;
            a.rotary_dim = rotary_dim;
            a.backward = backward;
            py::gil_scoped_release unlocked;
            qk::rope_cpu(a, num_threads);
        },
        arg("q"), arg("q_strides"), arg("k"), arg("k_strides"), arg("q_out"), arg("q_out_strides"), arg("k_out"),
        arg("k_out_strides"), arg("cos"), arg("cos_strides"), arg("sin"), arg("sin_strides"), arg("dtype"),
        arg("cos_dtype"), arg("batch"), arg("heads_q"), arg("heads_k"), arg("seqlen"), arg("head_dim"),
        arg("rotary_dim"), arg("backward"), arg("num_threads"));
}
