// Decode GEMV of the fused LoRA linear op with an NF4 base weight: argument checks and the dtype
// dispatch. The kernel is in lora_gemv.cuh, compiled in one part per dtype (lora_gemv_<dtype>.cu).
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "lora.h"
#include "lora_gemv.cuh"
#include "nf4.h"

namespace qk {
namespace gemv {

void allow_tile_smem(const void* kernel, int bytes) {
    if (bytes <= kDefaultSmemBytes) return;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) throw std::runtime_error(std::string("lora_gemv_nf4_kernel: ") + cudaGetErrorString(err));
    static std::mutex mutex;
    static std::set<std::pair<const void*, int>> done;
    std::lock_guard<std::mutex> lock(mutex);
    if (done.count({kernel, device})) return;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTileBytes);
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("lora_gemv_nf4_kernel: cannot allow ") + std::to_string(kTileBytes) +
                                 " bytes of shared memory: " + cudaGetErrorString(err));
    done.insert({kernel, device});
}

}  // namespace gemv

void lora_gemv_nf4_cuda(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                        const float* absmax, const NestedAbsmax& nested, int64_t blocksize, int64_t N,
                        const void* bias, const float* xa, const void* lora_B, int64_t rank, float scaling,
                        void* y, uintptr_t stream) {
    if (M < 0 || M > kLoraGemvMaxRows)
        throw std::invalid_argument("lora_gemv_nf4_cuda: M must be in 0.." + std::to_string(kLoraGemvMaxRows) +
                                    ", got " + std::to_string(M));
    if (K < 0 || N < 0 || rank < 0) throw std::invalid_argument("lora_gemv_nf4_cuda: K, N and rank must be >= 0");
    const int blocksize_shift = exact_log2(blocksize);
    if (blocksize_shift < 5 || blocksize_shift > 12)
        throw std::invalid_argument("lora_gemv_nf4_cuda: blocksize must be a power of two in 32..4096, got " +
                                    std::to_string(blocksize));
    if (reinterpret_cast<uintptr_t>(packed) % 16 != 0)
        throw std::invalid_argument("lora_gemv_nf4_cuda: packed must be 16-byte aligned");
    if (nested.absmax_q != nullptr && nested.nested_blocksize <= 0)
        throw std::invalid_argument("lora_gemv_nf4_cuda: nested_blocksize must be > 0");
    if (rank > 0 && (xa == nullptr || lora_B == nullptr))
        throw std::invalid_argument("lora_gemv_nf4_cuda: rank > 0 needs xa and lora_B");
    if (M == 0 || N == 0) return;
    const AbsmaxSource src{absmax,        nested.absmax_q, nested.nested_absmax,
                           nested.nested_code, nested.offset,   nested.nested_blocksize,
                           exact_log2(nested.nested_blocksize)};
    dispatch_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const gemv::GemvArgs<T> args{static_cast<const T*>(x), packed, src, static_cast<const T*>(bias), xa,
                                     static_cast<const T*>(lora_B), static_cast<T*>(y), M, K, N, rank,
                                     (N * K + 1) / 2, 0, blocksize_shift - 5, scaling};
        gemv::launch_lora_gemv<T>(args, as_stream(stream));
    });
}

}  // namespace qk
