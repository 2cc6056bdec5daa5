// The fp16 decode GEMV kernels (lora_gemv.cuh): one of three parts that compile in parallel.
#include "lora_gemv.cuh"

namespace qk::gemv {

template void launch_lora_gemv<__half>(const GemvArgs<__half>&, cudaStream_t);

}  // namespace qk::gemv
