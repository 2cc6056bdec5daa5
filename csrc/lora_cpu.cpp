// CPU pieces of the fused LoRA linear op: dequantize a flat element range of an NF4 weight,
// so the Python tiled forward / backward (backends/lora_cpu.py) never materializes all of W.
//
// The per-block work is nf4_dequantize_cpu's (its SIMD lookup paths, its threading): a range
// is a partial first block, dequantized whole into a small buffer and copied, then whole
// blocks from a block boundary on. With double quant the fp32 absmax of the blocks in range
// is computed here first (same two fp32 operations as nf4_cpu.cpp) and passed as plain absmax.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "lora.h"
#include "nf4.h"
#include "parallel.h"

namespace qk {
namespace {

int64_t element_size(DType dtype) {
    switch (dtype) {
        case DType::F32: return 4;
        case DType::F16:
        case DType::BF16: return 2;
    }
    throw std::invalid_argument("unknown dtype tag " + std::to_string(static_cast<int>(dtype)));
}

// The product is rounded to fp32 on its own before the add, whatever -ffp-contract this file
// is compiled with (only nf4_cpu.cpp gets -ffp-contract=off): bitsandbytes rounds both steps.
float nested_block_absmax(const NestedAbsmax& nested, int64_t b) {
    volatile float scaled = nested.nested_code[nested.absmax_q[b]] * nested.nested_absmax[b / nested.nested_blocksize];
    return scaled + *nested.offset;
}

}  // namespace

void nf4_dequantize_range_cpu(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested,
                              int64_t start, int64_t count, int64_t blocksize, void* out, DType dtype,
                              int num_threads) {
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)))
        throw std::invalid_argument("blocksize must be a power of two in [32, 4096], got " +
                                    std::to_string(blocksize));
    if (start < 0 || count < 0) throw std::invalid_argument("nf4_dequantize_range_cpu: start and count must be >= 0");
    if (nested.absmax_q && nested.nested_blocksize <= 0)
        throw std::invalid_argument("nf4_dequantize_range_cpu: nested_blocksize must be > 0");
    const int64_t esize = element_size(dtype);
    if (count == 0) return;
    const int64_t end = start + count;
    const int64_t first_block = start / blocksize;
    const int64_t nblocks = (end - 1) / blocksize - first_block + 1;

    // fp32 absmax of blocks first_block .. first_block + nblocks - 1
    std::vector<float> expanded;
    const float* scales = absmax + first_block;
    if (nested.absmax_q) {
        expanded.resize(static_cast<size_t>(nblocks));
        for (int64_t i = 0; i < nblocks; ++i) expanded[i] = nested_block_absmax(nested, first_block + i);
        scales = expanded.data();
    }
    const NestedAbsmax plain;
    char* dst = static_cast<char*>(out);

    // Head: the range starts inside a block. Dequantize that block from its start (block starts
    // are even elements, so whole bytes) up to the range end or the block end, keep the tail.
    int64_t body = start;
    if (start % blocksize != 0) {
        const int64_t block_start = first_block * blocksize;
        const int64_t head_end = std::min(end, block_start + blocksize);
        alignas(64) char buffer[4096 * 4];
        nf4_dequantize_cpu(packed + block_start / 2, scales, plain, head_end - block_start, blocksize, buffer, dtype,
                           1);
        std::memcpy(dst, buffer + (start - block_start) * esize, static_cast<size_t>((head_end - start) * esize));
        body = head_end;
    }
    // Body: whole blocks from a block boundary (the last one may end early, as a partial block).
    if (body < end)
        nf4_dequantize_cpu(packed + body / 2, scales + (body / blocksize - first_block), plain, end - body, blocksize,
                           dst + (body - start) * esize, dtype, num_threads);
}

void dropout_keep_mask_cpu(uint8_t* keep, int64_t n, uint64_t seed, uint64_t threshold, int num_threads) {
    if (n < 0) throw std::invalid_argument("dropout_keep_mask_cpu: negative element count");
    const int64_t pairs = (n + 1) / 2;
    parallel_for(pairs, 2, num_threads, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
            uint64_t z = seed + static_cast<uint64_t>(j + 1) * 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            keep[2 * j] = (z & 0xFFFFFFFFull) >= threshold;
            if (2 * j + 1 < n) keep[2 * j + 1] = (z >> 32) >= threshold;
        }
    });
}

}  // namespace qk
