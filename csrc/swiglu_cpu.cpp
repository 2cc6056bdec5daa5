// CPU SwiGLU (see swiglu.h). Memory-bound: each element is read once and written once, in
// chunks of a row that the threads of parallel.h share. A chunk is converted to fp32 buffers,
// computed with GCC vector extensions and converted back; the compute step is compiled for
// AVX-512 (16 lanes), AVX2 + FMA (8) and the baseline ISA (8), picked at load time (cpu_isa.h).
// The step is compute-bound (an exp and a division per element), so wider vectors pay.
//
// act(x) = x * sigmoid(z(x)), with z = x (silu) or 2 sqrt(2/pi) (x + 0.044715 x^3) (gelu_tanh:
// 0.5 (1 + tanh(y)) = sigmoid(2y), so no cancellation where tanh -> -1), and
// act'(x) = s + x s (1 - s) z'(x). exp is a vector polynomial (Cephes expf, about 1 ulp), so
// the loops vectorize without a vector math library.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "cpu_isa.h"
#include "float_convert.h"
#include "parallel.h"
#include "swiglu.h"

namespace qk {
namespace {

constexpr int64_t kChunk = 512;  // columns per unit of work: 2 KiB per fp32 buffer, all in L1
constexpr int kMaxLanes = 16;    // buffers are padded to whole vectors of the widest step

#pragma GCC diagnostic ignored "-Wpsabi"
// N-float vectors: 8 (AVX2 registers, two SSE registers on the baseline) or 16 (AVX-512). They
// never cross a call boundary (every helper is always_inline), so GCC's ABI note is moot.
template <int N>
struct Vec {
    typedef float f __attribute__((vector_size(4 * N)));
    typedef int32_t i __attribute__((vector_size(4 * N)));
    typedef uint32_t u __attribute__((vector_size(4 * N)));
};

#define QK_INLINE inline __attribute__((always_inline))

constexpr float kGeluK = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float kGeluKC = kGeluK * 0.044715f;

template <int N>
QK_INLINE typename Vec<N>::f load(const float* p) {
    typename Vec<N>::f v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

template <int N>
QK_INLINE void store(float* p, const typename Vec<N>::f& v) {
    std::memcpy(p, &v, sizeof(v));
}

// A shuffle rather than f{x, ..., x}, which GCC assembles lane by lane instead of broadcasting.
template <int N>
QK_INLINE typename Vec<N>::f splat(float x) {
    return __builtin_shuffle(typename Vec<N>::f{x}, typename Vec<N>::i{});
}

// e^x; inputs are clamped to [-87.3, 88], so results stay normal and finite (below -87.3 the
// callers' sigmoid is about 1e-38 instead of smaller: an absolute error under 1e-37)
template <int N>
QK_INLINE typename Vec<N>::f exp_v(const typename Vec<N>::f& in) {
    using F = typename Vec<N>::f;
    using I = typename Vec<N>::i;
    F x = in < -87.3f ? splat<N>(-87.3f) : in;
    x = x > 88.0f ? splat<N>(88.0f) : x;
    const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    F r = x - n * 0.693359375f;  // ln 2 in two parts (Cody-Waite): n * hi is exact
    r = r - n * -2.12194440e-4f;
    F p = splat<N>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    F two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    return p * two_n;
}

// 1 / (1 + e^-z) from e = e^-|z| <= 1: no overflow, and e / (1 + e) keeps its relative precision
// where z is very negative
template <int N>
QK_INLINE typename Vec<N>::f sigmoid(const typename Vec<N>::f& z) {
    const typename Vec<N>::f e = exp_v<N>(z < 0.0f ? z : -z);
    const typename Vec<N>::f r = 1.0f / (1.0f + e);
    return z < 0.0f ? e * r : r;
}

// z and z' of act(x) = x sigmoid(z(x))
template <Activation kAct, int N>
QK_INLINE typename Vec<N>::f z_of(const typename Vec<N>::f& x) {
    if constexpr (kAct == Activation::Silu) return x;
    return x * (kGeluK + kGeluKC * (x * x));
}

template <Activation kAct, int N>
QK_INLINE typename Vec<N>::f dz_of(const typename Vec<N>::f& x) {
    if constexpr (kAct == Activation::Silu) return splat<N>(1.0f);
    return kGeluK + (3.0f * kGeluKC) * (x * x);
}

// fp32 -> dtype -> fp32: the activation rounded as transformers rounds it
template <int N>
QK_INLINE typename Vec<N>::f round_to(const typename Vec<N>::f& x, DType dtype) {
    using F = typename Vec<N>::f;
    using U = typename Vec<N>::u;
    if (dtype == DType::F32) return x;
    F out;
    if (dtype == DType::BF16) {
        U u;
        std::memcpy(&u, &x, sizeof(u));
        const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        const U nan = (u | 0x400000u) & 0xFFFF0000u;  // quiet, as float_to_bf16
        const U y = (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded;
        std::memcpy(&out, &y, sizeof(out));
        return out;
    }
    for (int i = 0; i < N; ++i) out[i] = fp16_to_float(float_to_fp16(x[i]));
    return out;
}

struct Fwd {
    const float* gate;
    const float* up;
    float* out;
    int64_t n;
    DType dtype;
};

struct Bwd {
    const float* dout;
    const float* gate;
    const float* up;
    float* dgate;
    float* dup;
    int64_t n;
    DType dtype;
};

template <Activation kAct, int N>
QK_INLINE void fwd_impl(const Fwd& t) {
    for (int64_t i = 0; i < t.n; i += N) {
        const typename Vec<N>::f g = load<N>(t.gate + i);
        const typename Vec<N>::f a = round_to<N>(g * sigmoid<N>(z_of<kAct, N>(g)), t.dtype);
        store<N>(t.out + i, a * load<N>(t.up + i));
    }
}

template <Activation kAct, int N>
QK_INLINE void bwd_impl(const Bwd& t) {
    using F = typename Vec<N>::f;
    for (int64_t i = 0; i < t.n; i += N) {
        const F g = load<N>(t.gate + i), d = load<N>(t.dout + i);
        const F s = sigmoid<N>(z_of<kAct, N>(g));
        const F gs = g * s;
        const F da = s + gs * (1.0f - s) * dz_of<kAct, N>(g);
        store<N>(t.dgate + i, d * load<N>(t.up + i) * da);
        store<N>(t.dup + i, d * round_to<N>(gs, t.dtype));
    }
}

template <int N>
QK_INLINE void fwd_any(const Fwd& t, Activation a) {
    a == Activation::Silu ? fwd_impl<Activation::Silu, N>(t) : fwd_impl<Activation::GeluTanh, N>(t);
}

template <int N>
QK_INLINE void bwd_any(const Bwd& t, Activation a) {
    a == Activation::Silu ? bwd_impl<Activation::Silu, N>(t) : bwd_impl<Activation::GeluTanh, N>(t);
}

void fwd_baseline(const Fwd& t, Activation a) { fwd_any<8>(t, a); }
void bwd_baseline(const Bwd& t, Activation a) { bwd_any<8>(t, a); }

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void fwd_avx2(const Fwd& t, Activation a) { fwd_any<8>(t, a); }
__attribute__((target("avx2,fma"))) void bwd_avx2(const Bwd& t, Activation a) { bwd_any<8>(t, a); }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void fwd_avx512(const Fwd& t, Activation a) {
    fwd_any<16>(t, a);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void bwd_avx512(const Bwd& t, Activation a) {
    bwd_any<16>(t, a);
}
#endif

using FwdStep = void (*)(const Fwd&, Activation);
using BwdStep = void (*)(const Bwd&, Activation);

FwdStep fwd_step() {
#if defined(__x86_64__)
    if (cpu_isa() >= CpuIsa::Avx512) return fwd_avx512;
    if (cpu_isa() >= CpuIsa::Avx2Fma) return fwd_avx2;
#endif
    return fwd_baseline;
}

BwdStep bwd_step() {
#if defined(__x86_64__)
    if (cpu_isa() >= CpuIsa::Avx512) return bwd_avx512;
    if (cpu_isa() >= CpuIsa::Avx2Fma) return bwd_avx2;
#endif
    return bwd_baseline;
}

// n elements of `dtype` at p -> dst (fp32), zeros up to a whole vector
void to_float(const void* p, DType dtype, int64_t n, float* dst) {
    if (dtype == DType::F32) {
        std::memcpy(dst, p, n * sizeof(float));
    } else if (dtype == DType::BF16) {
        const uint16_t* h = static_cast<const uint16_t*>(p);
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
    } else {
        const uint16_t* h = static_cast<const uint16_t*>(p);
        for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(h[i]);
    }
    for (int64_t i = n; i % kMaxLanes; ++i) dst[i] = 0.0f;
}

void from_float(const float* src, int64_t n, DType dtype, void* p) {
    if (dtype == DType::F32) {
        std::memcpy(p, src, n * sizeof(float));
    } else if (dtype == DType::BF16) {
        uint16_t* h = static_cast<uint16_t*>(p);
        for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(src[i]);
    } else {
        uint16_t* h = static_cast<uint16_t*>(p);
        for (int64_t i = 0; i < n; ++i) h[i] = float_to_fp16(src[i]);
    }
}

int64_t element_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

const void* at(const void* base, int64_t stride, int64_t row, int64_t col, DType dtype) {
    return static_cast<const char*>(base) + (row * stride + col) * element_size(dtype);
}

void* at(void* base, int64_t stride, int64_t row, int64_t col, DType dtype) {
    return static_cast<char*>(base) + (row * stride + col) * element_size(dtype);
}

void check(int64_t rows, int64_t cols, Activation activation) {
    if (rows < 0 || cols < 0) throw std::invalid_argument("swiglu: rows and cols must be >= 0");
    if (activation != Activation::Silu && activation != Activation::GeluTanh)
        throw std::invalid_argument("swiglu: activation must be 0 (silu) or 1 (gelu_tanh)");
}

// Calls fn(row, col, count) over chunks of up to kChunk columns of every row, on the threads.
template <typename Fn>
void for_chunks(int64_t rows, int64_t cols, int num_threads, Fn&& fn) {
    const int64_t per_row = (cols + kChunk - 1) / kChunk;
    parallel_for(rows * per_row, std::min(cols, kChunk) * 8, num_threads, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
            const int64_t row = u / per_row, col = (u % per_row) * kChunk;
            fn(row, col, std::min(kChunk, cols - col));
        }
    });
}

}  // namespace

void swiglu_fwd_cpu(const void* gate, int64_t gate_stride, const void* up, int64_t up_stride, void* out,
                    int64_t out_stride, int64_t rows, int64_t cols, DType dtype, Activation activation,
                    int num_threads) {
    check(rows, cols, activation);
    const FwdStep step = fwd_step();
    for_chunks(rows, cols, num_threads, [&](int64_t row, int64_t col, int64_t n) {
        alignas(32) float g[kChunk], u[kChunk], o[kChunk];
        to_float(at(gate, gate_stride, row, col, dtype), dtype, n, g);
        to_float(at(up, up_stride, row, col, dtype), dtype, n, u);
        step(Fwd{g, u, o, n, dtype}, activation);
        from_float(o, n, dtype, at(out, out_stride, row, col, dtype));
    });
}

void swiglu_bwd_cpu(const void* dout, int64_t dout_stride, const void* gate, int64_t gate_stride, const void* up,
                    int64_t up_stride, void* dgate, int64_t dgate_stride, void* dup, int64_t dup_stride, int64_t rows,
                    int64_t cols, DType dtype, Activation activation, int num_threads) {
    check(rows, cols, activation);
    const BwdStep step = bwd_step();
    for_chunks(rows, cols, num_threads, [&](int64_t row, int64_t col, int64_t n) {
        alignas(32) float d[kChunk], g[kChunk], u[kChunk], dg[kChunk], du[kChunk];
        to_float(at(dout, dout_stride, row, col, dtype), dtype, n, d);
        to_float(at(gate, gate_stride, row, col, dtype), dtype, n, g);
        to_float(at(up, up_stride, row, col, dtype), dtype, n, u);
        step(Bwd{d, g, u, dg, du, n, dtype}, activation);
        from_float(dg, n, dtype, at(dgate, dgate_stride, row, col, dtype));
        from_float(du, n, dtype, at(dup, dup_stride, row, col, dtype));
    });
}

}  // namespace qk
