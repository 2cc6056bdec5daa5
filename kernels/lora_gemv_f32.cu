// The fp32 decode GEMV kernels (lora_gemv.cuh): one of three parts that compile in parallel.
#include "lora_gemv.cuh"

namespace qk::gemv {

template void launch_lora_gemv<float>(const GemvArgs<float>&, cudaStream_t);

}  // namespace qk::gemv
