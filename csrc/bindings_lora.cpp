// pybind11 bindings of the lora kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "binding_utils.h"
#include "lora.h"
#include "nf4.h"

namespace py = pybind11;

using qk::binding::dtype_tag;
using qk::binding::nested_of;
using qk::binding::ptr;

void bind_lora(py::module_& m) {
    using py::arg;
    const auto release = py::call_guard<py::gil_scoped_release>();

    m.def(
        "nf4_dequantize_range_cpu",
        [](uintptr_t packed, uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax, uintptr_t nested_code,
           uintptr_t offset, int64_t nested_blocksize, int64_t start, int64_t count, int64_t blocksize, uintptr_t out,
           int dtype, int threads) {
            qk::nf4_dequantize_range_cpu(ptr<const uint8_t>(packed), ptr<const float>(absmax),
                                         nested_of(absmax_q, nested_absmax, nested_code, offset, nested_blocksize),
                                         start, count, blocksize, ptr<void>(out), dtype_tag(dtype), threads);
        },
        "Flat elements [start, start + count) of an NF4 tensor into out (count elements of dtype).",
        arg("packed"), arg("absmax"), arg("absmax_q"), arg("nested_absmax"), arg("nested_code"), arg("offset"),
        arg("nested_blocksize"), arg("start"), arg("count"), arg("blocksize"), arg("out"), arg("dtype"),
        arg("num_threads"), release);

    m.def(
        "dropout_keep_mask_cpu",
        [](uintptr_t keep, int64_t n, uint64_t seed, uint64_t threshold, int threads) {
            qk::dropout_keep_mask_cpu(ptr<uint8_t>(keep), n, seed, threshold, threads);
        },
        "Dropout keep mask (0/1 bytes) of n elements from seed; see reference/lora.py dropout_keep_mask.",
        arg("keep"), arg("n"), arg("seed"), arg("threshold"), arg("num_threads"), release);

    m.attr("lora_gemv_max_rows") = qk::kLoraGemvMaxRows;
    m.def(
        "lora_gemv_nf4_cpu",
        [](uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t packed, uintptr_t absmax, uintptr_t absmax_q,
           uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
           int64_t blocksize, int64_t N, uintptr_t bias, uintptr_t xa, uintptr_t lora_B, int64_t rank, float scaling,
           uintptr_t y, int threads) {
            qk::lora_gemv_nf4_cpu(ptr<const void>(x), dtype_tag(dtype), M, K, ptr<const uint8_t>(packed),
                                  ptr<const float>(absmax),
                                  nested_of(absmax_q, nested_absmax, nested_code, offset, nested_blocksize),
                                  blocksize, N, ptr<const void>(bias), ptr<const float>(xa), ptr<const void>(lora_B),
                                  rank, scaling, ptr<void>(y), threads);
        },
        "y[M, N] = x[M, K] @ W^T + bias + scaling * xa[M, r] @ lora_B^T with an NF4 W (M <= 16; bias may be 0).",
        arg("x"), arg("dtype"), arg("M"), arg("K"), arg("packed"), arg("absmax"), arg("absmax_q"),
        arg("nested_absmax"), arg("nested_code"), arg("offset"), arg("nested_blocksize"), arg("blocksize"), arg("N"),
        arg("bias"), arg("xa"), arg("lora_B"), arg("rank"), arg("scaling"), arg("y"), arg("num_threads"), release);

#ifdef QK_WITH_CUDA
    m.def(
        "lora_gemv_nf4_cuda",
        [](uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t packed, uintptr_t absmax, uintptr_t absmax_q,
           uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
           int64_t blocksize, int64_t N, uintptr_t bias, uintptr_t xa, uintptr_t lora_B, int64_t rank, float scaling,
           uintptr_t y, uintptr_t stream) {
            qk::lora_gemv_nf4_cuda(ptr<const void>(x), dtype_tag(dtype), M, K, ptr<const uint8_t>(packed),
                                   ptr<const float>(absmax),
                                   nested_of(absmax_q, nested_absmax, nested_code, offset, nested_blocksize),
                                   blocksize, N, ptr<const void>(bias), ptr<const float>(xa), ptr<const void>(lora_B),
                                   rank, scaling, ptr<void>(y), stream);
        },
        "y[M, N] = x[M, K] @ W^T + bias + scaling * xa[M, r] @ lora_B^T with an NF4 W (M <= 16; bias may be 0).",
        arg("x"), arg("dtype"), arg("M"), arg("K"), arg("packed"), arg("absmax"), arg("absmax_q"),
        arg("nested_absmax"), arg("nested_code"), arg("offset"), arg("nested_blocksize"), arg("blocksize"), arg("N"),
        arg("bias"), arg("xa"), arg("lora_B"), arg("rank"), arg("scaling"), arg("y"), arg("stream"), release);
#endif
}
