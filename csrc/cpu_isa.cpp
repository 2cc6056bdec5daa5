#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace qk {
namespace {

CpuIsa widest_supported() {
#if defined(__x86_64__)
    // every AVX2 + FMA CPU also has SSSE3
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::Avx2Fma;
    if (__builtin_cpu_supports("ssse3")) return CpuIsa::Ssse3;
#endif
    return CpuIsa::Baseline;
}

CpuIsa from_environment() {
    const char* setting = std::getenv("QLORA_KERNELS_CPU_ISA");
    if (setting == nullptr || *setting == '\0' || std::strcmp(setting, "auto") == 0) return widest_supported();
    if (std::strcmp(setting, "baseline") == 0) return CpuIsa::Baseline;
    throw std::invalid_argument(std::string("QLORA_KERNELS_CPU_ISA must be 'auto' (the widest instruction set this "
                                            "CPU supports) or 'baseline' (no SIMD extension), got '") +
                                setting + "'");
}

}  // namespace

CpuIsa cpu_isa() {
    static const CpuIsa isa = from_environment();
    return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
    switch (isa) {
        case CpuIsa::Avx2Fma: return "avx2";
        case CpuIsa::Ssse3: return "ssse3";
        case CpuIsa::Baseline: return "baseline";
    }
    return "baseline";
}

}  // namespace qk
