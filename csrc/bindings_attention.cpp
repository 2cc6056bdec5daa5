// pybind11 bindings of the attention kernels (see bindings.cpp for the conventions). Strides are
// (batch, head, seq) element strides; the head_dim stride must be 1.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "attention.h"
#include "binding_utils.h"

namespace py = pybind11;

using qk::binding::ptr;

namespace {

using Strides = std::array<int64_t, 3>;

qk::AttentionStrides strides_of(const Strides& s) { return {s[0], s[1], s[2]}; }

qk::AttentionArgs args_of(uintptr_t q, const Strides& q_strides, uintptr_t k, const Strides& k_strides, uintptr_t v,
                          const Strides& v_strides, uintptr_t out, const Strides& out_strides, uintptr_t lse,
                          const Strides& lse_strides, int dtype, int64_t batch, int64_t heads_q, int64_t heads_kv,
                          int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim, float softmax_scale, bool causal,
                          int64_t window_left, int64_t window_right, float softcap, uintptr_t alibi_slopes,
                          uintptr_t sinks, uintptr_t key_padding_mask, uintptr_t cu_seqlens, uintptr_t cu_seqlens_k) {
    qk::AttentionArgs a;
    a.q = ptr<const void>(q);
    a.k = ptr<const void>(k);
    a.v = ptr<const void>(v);
    a.out = ptr<void>(out);
    a.lse = ptr<float>(lse);
    a.q_strides = strides_of(q_strides);
    a.k_strides = strides_of(k_strides);
    a.v_strides = strides_of(v_strides);
    a.out_strides = strides_of(out_strides);
    a.lse_strides = strides_of(lse_strides);
    a.dtype = qk::binding::dtype_tag(dtype);
    a.batch = batch;
    a.heads_q = heads_q;
    a.heads_kv = heads_kv;
    a.seqlen_q = seqlen_q;
    a.seqlen_k = seqlen_k;
    a.head_dim = head_dim;
    a.softmax_scale = softmax_scale;
    a.causal = causal;
    a.window_left = window_left;
    a.window_right = window_right;
    a.softcap = softcap;
    a.alibi_slopes = ptr<const float>(alibi_slopes);
    a.sinks = ptr<const float>(sinks);
    a.key_padding_mask = ptr<const uint8_t>(key_padding_mask);
    a.cu_seqlens = ptr<const int32_t>(cu_seqlens);
    a.cu_seqlens_k = ptr<const int32_t>(cu_seqlens_k);
    return a;
}

}  // namespace

void bind_attention(py::module_& m) {
    using py::arg;
    const auto release = py::call_guard<py::gil_scoped_release>();

    m.def(
        "flash_attention_fwd_cpu",
        [](uintptr_t q, Strides q_strides, uintptr_t k, Strides k_strides, uintptr_t v, Strides v_strides,
           uintptr_t out, Strides out_strides, uintptr_t lse, Strides lse_strides, int dtype, int64_t batch,
           int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim,
           float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap,
           uintptr_t alibi_slopes, uintptr_t sinks, uintptr_t key_padding_mask, uintptr_t cu_seqlens,
           uintptr_t cu_seqlens_k, int num_threads) {
            qk::flash_attention_fwd_cpu(
                args_of(q, q_strides, k, k_strides, v, v_strides, out, out_strides, lse, lse_strides, dtype, batch,
                        heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, softmax_scale, causal, window_left,
                        window_right, softcap, alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k),
                num_threads);
        },
        arg("q"), arg("q_strides"), arg("k"), arg("k_strides"), arg("v"), arg("v_strides"), arg("out"),
        arg("out_strides"), arg("lse"), arg("lse_strides"), arg("dtype"), arg("batch"), arg("heads_q"),
        arg("heads_kv"), arg("seqlen_q"), arg("seqlen_k"), arg("head_dim"), arg("softmax_scale"), arg("causal"),
        arg("window_left"), arg("window_right"), arg("softcap"), arg("alibi_slopes"), arg("sinks"),
        arg("key_padding_mask"), arg("cu_seqlens"), arg("cu_seqlens_k"), arg("num_threads"), release);

    m.def(
        "flash_attention_bwd_cpu",
        [](uintptr_t dout, Strides dout_strides, uintptr_t dlse, Strides dlse_strides, uintptr_t q, Strides q_strides,
           uintptr_t k, Strides k_strides, uintptr_t v, Strides v_strides, uintptr_t out, Strides out_strides,
           uintptr_t lse, Strides lse_strides, uintptr_t dq, Strides dq_strides, uintptr_t dk, Strides dk_strides,
           uintptr_t dv, Strides dv_strides, uintptr_t dsinks, int dtype, int64_t batch, int64_t heads_q,
           int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim, float softmax_scale, bool causal,
           int64_t window_left, int64_t window_right, float softcap, uintptr_t alibi_slopes, uintptr_t sinks,
           uintptr_t key_padding_mask, uintptr_t cu_seqlens, uintptr_t cu_seqlens_k, int num_threads) {
            qk::AttentionGrads grads;
            grads.dout = ptr<const void>(dout);
            grads.dq = ptr<void>(dq);
            grads.dk = ptr<void>(dk);
            grads.dv = ptr<void>(dv);
            grads.dlse = ptr<const float>(dlse);
            grads.dsinks = ptr<float>(dsinks);
            grads.dout_strides = strides_of(dout_strides);
            grads.dq_strides = strides_of(dq_strides);
            grads.dk_strides = strides_of(dk_strides);
            grads.dv_strides = strides_of(dv_strides);
            grads.dlse_strides = strides_of(dlse_strides);
            qk::flash_attention_bwd_cpu(
                args_of(q, q_strides, k, k_strides, v, v_strides, out, out_strides, lse, lse_strides, dtype, batch,
                        heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, softmax_scale, causal, window_left,
                        window_right, softcap, alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k),
                grads, num_threads);
        },
        arg("dout"), arg("dout_strides"), arg("dlse"), arg("dlse_strides"), arg("q"), arg("q_strides"), arg("k"),
        arg("k_strides"), arg("v"), arg("v_strides"), arg("out"), arg("out_strides"), arg("lse"), arg("lse_strides"),
        arg("dq"), arg("dq_strides"), arg("dk"), arg("dk_strides"), arg("dv"), arg("dv_strides"), arg("dsinks"),
        arg("dtype"), arg("batch"), arg("heads_q"), arg("heads_kv"), arg("seqlen_q"), arg("seqlen_k"),
        arg("head_dim"), arg("softmax_scale"), arg("causal"), arg("window_left"), arg("window_right"),
        arg("softcap"), arg("alibi_slopes"), arg("sinks"), arg("key_padding_mask"), arg("cu_seqlens"),
        arg("cu_seqlens_k"), arg("num_threads"), release);

    m.def("flash_attention_cpu_tile_steps", &qk::flash_attention_cpu_tile_steps,
          "(query block, key block) tile steps the CPU attention kernels ran since load; differences show the "
          "work a call did");
    m.def("flash_attention_cpu_backward_units", &qk::flash_attention_cpu_backward_units,
          "(batch, kv head, key split) work units the CPU attention backward ran since load");
}
