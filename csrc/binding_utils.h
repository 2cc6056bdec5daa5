// What every bindings_*.cpp needs to turn Python's integers into kernel arguments: tensors
// cross as addresses (tensor.data_ptr()), dtypes as tags, double-quant state as four addresses.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "nf4.h"

namespace qk::binding {

template <typename T>
T* ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

inline DType dtype_tag(int tag) {
    if (tag < 0 || tag > 2) throw std::invalid_argument("dtype tag must be 0 (fp32), 1 (fp16) or 2 (bf16)");
    return static_cast<DType>(tag);
}

// absmax_q == 0: plain fp32 absmax; else the double-quant state, all four addresses required.
inline NestedAbsmax nested_of(uintptr_t absmax_q, uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset,
                              int64_t nested_blocksize) {
    NestedAbsmax nested;
    if (absmax_q) {
        if (!nested_absmax || !nested_code || !offset)
            throw std::invalid_argument("double quant needs nested_absmax, nested_code and offset");
        if (nested_blocksize <= 0) throw std::invalid_argument("nested_blocksize must be positive");
        nested.absmax_q = ptr<const uint8_t>(absmax_q);
        nested.nested_absmax = ptr<const float>(nested_absmax);
        nested.nested_code = ptr<const float>(nested_code);
        nested.offset = ptr<const float>(offset);
        nested.nested_blocksize = nested_blocksize;
    }
    return nested;
}

}  // namespace qk::binding
