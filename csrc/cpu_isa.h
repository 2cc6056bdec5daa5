// The instruction set the CPU kernels run on, chosen once when the module loads: the widest one
// the CPU supports, or the baseline (x86-64's SSE2, or any other architecture's default) when
// QLORA_KERNELS_CPU_ISA=baseline, so that the portable code paths can be run and tested on a
// machine that would otherwise never take them.
#pragma once

namespace qk {

// Ordered: each level includes the ones below it.
enum class CpuIsa { Baseline, Ssse3, Avx2Fma };

// The level in effect. The first call reads QLORA_KERNELS_CPU_ISA ("auto" or unset: the widest
// the CPU supports; "baseline": no SIMD extension) and throws std::invalid_argument on any other
// value; the module's init makes that first call, so a bad value fails the import.
CpuIsa cpu_isa();

// "avx2", "ssse3" or "baseline".
const char* cpu_isa_name(CpuIsa isa);

}  // namespace qk
