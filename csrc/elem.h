// Element types of the fp32 / fp16 / bf16 tensors the CPU kernels read and write: the storage
// type of each DType and its conversions to and from fp32 (round to nearest even).
#pragma once

#include <cstdint>

#include "float_convert.h"
#include "nf4.h"  // DType

namespace qk {

template <DType kType>
struct Elem;
template <>
struct Elem<DType::F32> {
    using T = float;
    static float load(float x) { return x; }
    static float store(float x) { return x; }
};
template <>
struct Elem<DType::F16> {
    using T = uint16_t;
    static float load(uint16_t x) { return fp16_to_float(x); }
    static uint16_t store(float x) { return float_to_fp16(x); }
};
template <>
struct Elem<DType::BF16> {
    using T = uint16_t;
    static float load(uint16_t x) { return bf16_to_float(x); }
    static uint16_t store(float x) { return float_to_bf16(x); }
};

}  // namespace qk
