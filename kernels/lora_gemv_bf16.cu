// The bf16 decode GEMV kernels (lora_gemv.cuh): one of three parts that compile in parallel.
#include "lora_gemv.cuh"

namespace qk::gemv {

template void launch_lora_gemv<__nv_bfloat16>(const GemvArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace qk::gemv
