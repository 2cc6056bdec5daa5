// pybind11 bindings of qlora_kernels._C. Tensors cross as integer addresses
// (tensor.data_ptr()); Python validates shapes, dtypes and devices before calling.
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "binding_utils.h"
#include "cpu_isa.h"
#include "nf4.h"
#include "parallel.h"

namespace py = pybind11;

// Each op family binds its own functions (bindings_<family>.cpp).
void bind_attention(py::module_& m);
void bind_lora(py::module_& m);
void bind_loss(py::module_& m);
void bind_norm(py::module_& m);
void bind_rope(py::module_& m);
void bind_swiglu(py::module_& m);

using qk::binding::dtype_tag;
using qk::binding::nested_of;
using qk::binding::ptr;

PYBIND11_MODULE(_C, m) {
    m.doc() = "qlora_kernels native kernels (no torch ABI: raw pointers and sizes)";
    using py::arg;
    const auto release = py::call_guard<py::gil_scoped_release>();

    m.def(
        "nf4_quantize_cpu",
        [](uintptr_t A, int dtype, int64_t n, int64_t blocksize, uintptr_t packed, uintptr_t absmax, int threads) {
            qk::nf4_quantize_cpu(ptr<const void>(A), dtype_tag(dtype), n, blocksize, ptr<uint8_t>(packed),
                                 ptr<float>(absmax), threads);
        },
        arg("A"), arg("dtype"), arg("n"), arg("blocksize"), arg("packed"), arg("absmax"), arg("num_threads"),
        release);
    m.def(
        "nf4_dequantize_cpu",
        [](uintptr_t packed, uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax, uintptr_t nested_code,
           uintptr_t offset, int64_t nested_blocksize, int64_t n, int64_t blocksize, uintptr_t out, int dtype,
           int threads) {
            qk::nf4_dequantize_cpu(ptr<const uint8_t>(packed), ptr<const float>(absmax),
                                   nested_of(absmax_q, nested_absmax, nested_code, offset, nested_blocksize), n,
                                   blocksize, ptr<void>(out), dtype_tag(dtype), threads);
        },
        arg("packed"), arg("absmax"), arg("absmax_q"), arg("nested_absmax"), arg("nested_code"), arg("offset"),
        arg("nested_blocksize"), arg("n"), arg("blocksize"), arg("out"), arg("dtype"), arg("num_threads"), release);
    m.def(
        "quantize_blockwise_8bit_cpu",
        [](uintptr_t A, uintptr_t lut, int64_t n, int64_t blocksize, uintptr_t out, uintptr_t absmax, int threads) {
            qk::quantize_blockwise_8bit_cpu(ptr<const float>(A), ptr<const uint8_t>(lut), n, blocksize,
                                            ptr<uint8_t>(out), ptr<float>(absmax), threads);
        },
        arg("A"), arg("lut"), arg("n"), arg("blocksize"), arg("out"), arg("absmax"), arg("num_threads"), release);

    py::dict build;
    // Read here so that a bad QLORA_KERNELS_CPU_ISA fails the import, not the first kernel call.
    build["cpu_isa"] = std::string(qk::cpu_isa_name(qk::cpu_isa()));
#ifdef QK_WITH_CUDA
    build["cuda"] = true;
    build["cuda_archs"] = std::string(QK_CUDA_ARCHS);
    build["cuda_runtime"] = std::string(QK_CUDA_VERSION);
    m.def(
        "nf4_quantize_cuda",
        [](uintptr_t A, int dtype, int64_t n, int64_t blocksize, uintptr_t packed, uintptr_t absmax,
           uintptr_t stream) {
            qk::nf4_quantize_cuda(ptr<const void>(A), dtype_tag(dtype), n, blocksize, ptr<uint8_t>(packed),
                                  ptr<float>(absmax), stream);
        },
        arg("A"), arg("dtype"), arg("n"), arg("blocksize"), arg("packed"), arg("absmax"), arg("stream"), release);
    m.def(
        "nf4_dequantize_cuda",
        [](uintptr_t packed, uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax, uintptr_t nested_code,
           uintptr_t offset, int64_t nested_blocksize, int64_t n, int64_t blocksize, uintptr_t out, int dtype,
           uintptr_t stream) {
            qk::nf4_dequantize_cuda(ptr<const uint8_t>(packed), ptr<const float>(absmax),
                                    nested_of(absmax_q, nested_absmax, nested_code, offset, nested_blocksize), n,
                                    blocksize, ptr<void>(out), dtype_tag(dtype), stream);
        },
        arg("packed"), arg("absmax"), arg("absmax_q"), arg("nested_absmax"), arg("nested_code"), arg("offset"),
        arg("nested_blocksize"), arg("n"), arg("blocksize"), arg("out"), arg("dtype"), arg("stream"), release);
    m.def(
        "quantize_blockwise_8bit_cuda",
        [](uintptr_t A, uintptr_t lut, int64_t n, int64_t blocksize, uintptr_t out, uintptr_t absmax,
           uintptr_t stream) {
            qk::quantize_blockwise_8bit_cuda(ptr<const float>(A), ptr<const uint8_t>(lut), n, blocksize,
                                             ptr<uint8_t>(out), ptr<float>(absmax), stream);
        },
        arg("A"), arg("lut"), arg("n"), arg("blocksize"), arg("out"), arg("absmax"), arg("stream"), release);
    m.def("cuda_device_count", [] {
        const char* error = nullptr;
        const int count = qk::cuda_device_count(&error);
        return py::make_tuple(count, error ? py::str(error) : py::str(""));
    });
#else
    build["cuda"] = false;
    build["cuda_archs"] = std::string("");
    build["cuda_runtime"] = std::string("");
#endif
    m.attr("build_info") = build;

    // Test hook of qk::parallel_for: runs it over [0, n), each index taking 100 us and adding 1
    // to its hit count, through a parallel_for nested in each chunk when `nested`; index
    // throw_at (-1: none) throws. Returns (hits, late, error): late counts the calls of fn still
    // running when parallel_for came back or started in the 20 ms after; error is what it threw.
    m.def(
        "_parallel_for_probe",
        [](int64_t n, int threads, int64_t throw_at, bool nested) {
            if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
            std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
            std::atomic<int> running{0}, started{0};
            const auto visit = [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; ++i) {
                    if (i == throw_at) throw std::runtime_error("parallel_for_probe: item " + std::to_string(i));
                    std::this_thread::sleep_for(std::chrono::microseconds(100));
                    ++hits[i];
                }
            };
            std::string error;
            int late;
            {
                py::gil_scoped_release unlocked;
                try {
                    qk::parallel_for(n, qk::kMinItemsPerThread, threads, [&](int64_t begin, int64_t end) {
                        ++started;
                        ++running;
                        struct Leave {
                            std::atomic<int>& running;
                            ~Leave() { --running; }
                        } leave{running};
                        if (!nested) return visit(begin, end);
                        qk::parallel_for(end - begin, qk::kMinItemsPerThread, threads,
                                         [&](int64_t b, int64_t e) { visit(begin + b, begin + e); });
                    });
                } catch (const std::exception& e) {
                    error = e.what();
                }
                const int running_at_return = running.load(), started_at_return = started.load();
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
                late = running_at_return + (started.load() - started_at_return);
            }
            py::list counts;
            for (const auto& h : hits) counts.append(h.load());
            return py::make_tuple(counts, late, error.empty() ? py::object(py::none()) : py::object(py::str(error)));
        },
        arg("n"), arg("num_threads"), arg("throw_at") = -1, arg("nested") = false);
    bind_attention(m);
    bind_lora(m);
    bind_loss(m);
    bind_norm(m);
    bind_rope(m);
    bind_swiglu(m);
}
