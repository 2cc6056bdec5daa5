#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace qk {
namespace {

constexpr CpuIsa kLevels[] = {CpuIsa::Baseline, CpuIsa::Ssse3, CpuIsa::Avx2Fma, CpuIsa::Avx512, CpuIsa::Avx512Bf16};

// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers.
CpuIsa widest_supported() {
#if defined(__x86_64__)
    // every AVX2 + FMA CPU also has SSSE3, every AVX-512 one AVX2, FMA and F16C
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return __builtin_cpu_supports("avx512bf16") ? CpuIsa::Avx512Bf16 : CpuIsa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return CpuIsa::Avx2Fma;
    if (__builtin_cpu_supports("ssse3")) return CpuIsa::Ssse3;
#endif
    return CpuIsa::Baseline;
}

CpuIsa from_environment() {
    const char* setting = std::getenv("QLORA_KERNELS_CPU_ISA");
    const CpuIsa widest = widest_supported();
    if (setting == nullptr || *setting == '\0' || std::strcmp(setting, "auto") == 0) return widest;
    for (CpuIsa level : kLevels) {
        if (std::strcmp(setting, cpu_isa_name(level)) != 0) continue;
        if (level > widest)
            throw std::invalid_argument(std::string("QLORA_KERNELS_CPU_ISA='") + setting +
                                        "' asks for an instruction set this CPU lacks; it supports up to '" +
                                        cpu_isa_name(widest) + "'");
        return level;
    }
    throw std::invalid_argument(std::string("QLORA_KERNELS_CPU_ISA must be 'auto' (the widest instruction set this "
                                            "CPU supports), 'baseline' (no SIMD extension), 'ssse3', 'avx2', "
                                            "'avx512' or 'avx512bf16', got '") +
                                setting + "'");
}

}  // namespace

CpuIsa cpu_isa() {
    static const CpuIsa isa = from_environment();
    return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
    switch (isa) {
        case CpuIsa::Avx512Bf16: return "avx512bf16";
        case CpuIsa::Avx512: return "avx512";
        case CpuIsa::Avx2Fma: return "avx2";
        case CpuIsa::Ssse3: return "ssse3";
        case CpuIsa::Baseline: return "baseline";
    }
    return "baseline";
}

}  // namespace qk
