// The instruction set the CPU kernels run on, chosen once when the module loads: the widest one
// the CPU supports, or a narrower level named by QLORA_KERNELS_CPU_ISA, so that every code path
// (down to the portable one: x86-64's SSE2, or any other architecture's default) can be run and
// tested on a machine that would otherwise never take it.
#pragma once

namespace qk {

// Ordered: each level includes the ones below it.
//   Ssse3:      SSSE3
//   Avx2Fma:    AVX2, FMA and F16C
//   Avx512:     AVX-512 F, BW, VL and DQ (and all of the above)
//   Avx512Bf16: AVX512-BF16 on top of Avx512
enum class CpuIsa { Baseline, Ssse3, Avx2Fma, Avx512, Avx512Bf16 };

// The level in effect. The first call reads QLORA_KERNELS_CPU_ISA ("auto" or unset: the widest
// the CPU supports; "baseline", "ssse3", "avx2", "avx512" or "avx512bf16": that level) and throws
// std::invalid_argument on any other value or on a level this CPU lacks; the module's init makes
// that first call, so a bad value fails the import.
CpuIsa cpu_isa();

// "avx512bf16", "avx512", "avx2", "ssse3" or "baseline": the names QLORA_KERNELS_CPU_ISA takes.
const char* cpu_isa_name(CpuIsa isa);

}  // namespace qk
