"""NF4Linear's forward / backward through the nf4_linear op: the CPU GEMV for M <= 16 tokens,
reused dequantize tiles above, against the reference (W dequantized, then F.linear); a whole
model decoding greedily as with the reference forward; PEFT LoRA over NF4Linear at M = 1 on
the GEMV with its rank fused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.backends import lora_cpu, lora_gemv_cpu
from qlora_kernels.modules import nf4_linear as nf4_linear_module

from helpers import tiny_causal_lm
from test_lora_any_model import OpCalls

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference_forward(layer, x):
    """NF4Linear's forward as the reference defines it: the whole W dequantized, then F.linear."""
    w = layer.dequantize(layer.compute_dtype)
    bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
    return nn.functional.linear(x.to(layer.compute_dtype), w, bias).to(x.dtype)


@pytest.fixture
def gemv_calls(monkeypatch):
    """The CPU GEMV's calls, (M, rank) each, while it still computes."""
    calls = []
    real = lora_gemv_cpu.lora_gemv_cpu

    def counting(x, weight, bias, xa, lora_B, scaling):
        calls.append((x.shape[0], 0 if xa is None else xa.shape[1]))
        return real(x, weight, bias, xa, lora_B, scaling)

    monkeypatch.setattr(lora_gemv_cpu, "lora_gemv_cpu", counting)
    return calls


def _layer(N, K, compute_dtype, double_quant, bias, blocksize=64):
    linear = nn.Linear(K, N, bias=bias)
    return qk.NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                    compute_dtype=compute_dtype)


@pytest.mark.parametrize("M", (1, 4, 16, 17, 64))
@pytest.mark.parametrize("compute_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", (True, False))
@pytest.mark.parametrize("N, K, bias", ((37, 129, True), (64, 200, False)))  # N·K odd: rows split bytes
def test_forward_and_grads_as_accurate_as_the_reference(M, compute_dtype, double_quant, N, K, bias, gemv_calls):
    """y, dx and dbias: error against fp64 at most twice the reference forward's own (the same
    math in compute_dtype), the GEMV taking exactly the M <= 16 forwards."""
    layer = _layer(N, K, compute_dtype, double_quant, bias)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N).to(compute_dtype)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (M, N)
    (dx,) = torch.autograd.grad(y, x, dy.float(), retain_graph=bias)
    assert gemv_calls == ([(M, 0)] if M <= 16 else [])

    xc = x.detach().to(compute_dtype).double()
    W = layer.dequantize(compute_dtype).double()
    exact_y = xc @ W.t() + (layer.bias.detach().to(compute_dtype).double() if bias else 0)
    exact_dx = dy.double() @ W
    xr = x.detach().requires_grad_()
    ref_y = reference_forward(layer, xr)
    (ref_dx,) = torch.autograd.grad(ref_y, xr, dy.float())
    for name, got, ref, exact in (("y", y, ref_y, exact_y), ("dx", dx, ref_dx, exact_dx)):
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * exact.abs().max().item(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"
    if bias:
        (dbias,) = torch.autograd.grad(y, layer.bias, dy.float())
        torch.testing.assert_close(dbias, dy.double().sum(0).to(compute_dtype).float(), rtol=1e-2 if
                                   compute_dtype != torch.float32 else 1e-6, atol=1e-5)


def test_forward_dequantizes_no_whole_weight():
    """No nf4_dequantize (a fresh N x K tensor) in the forward or backward at any M; the tiles
    above 16 tokens go into the one reused buffer."""
    layer = _layer(96, 128, torch.bfloat16, True, True)
    for M in (1, 16, 17, 40):
        x = torch.randn(M, 128, requires_grad=True)
        with OpCalls() as ops:
            layer(x).sum().backward()
        assert ops.calls == {"nf4_linear": 1, "nf4_linear_bwd": 1}, (M, ops.calls)
    buffers = lora_cpu._scratch.buffers
    before = buffers[torch.bfloat16].data_ptr()
    layer(torch.randn(40, 128))
    assert buffers[torch.bfloat16].data_ptr() == before


def test_op_refuses_bad_arguments():
    layer = _layer(24, 64, torch.float32, True, True)
    args = layer.nf4_weight.op_args()
    with pytest.raises(ValueError, match=r"bias must be \[24\]"):
        torch.ops.qlora_kernels.nf4_linear(torch.randn(2, 64), *args, 24, torch.randn(25))
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.qlora_kernels.nf4_linear(torch.randn(2, 64).double(), *args, 24, None)
    with pytest.raises(ValueError, match=r"of a \(24, 65\) weight"):  # x's features do not fit W
        torch.ops.qlora_kernels.nf4_linear(torch.randn(2, 65), *args, 24, None)
    with pytest.raises(ValueError, match="x has 65 features, the layer expects 64"):
        layer(torch.randn(2, 65))


@pytest.mark.parametrize("prompt", (5, 20))  # a prompt of up to 16 tokens and a longer one
def test_tiny_llama_generates_the_reference_tokens(prompt, monkeypatch, gemv_calls):
    model = tiny_causal_lm("llama").eval()
    qk.quantize_model(model, compute_dtype=torch.float32, progress=False)
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        layers = sum(isinstance(m, qk.NF4Linear) for m in model.modules())
        assert len(gemv_calls) == layers * (8 if prompt <= 16 else 7)
        monkeypatch.setattr(nf4_linear_module.NF4Linear, "forward", reference_forward)
        want = model.generate(ids, **kwargs)
    assert torch.equal(ours, want)


def test_peft_lora_over_nf4linear_decodes_on_the_gemv(gemv_calls, monkeypatch):
    """Patched PEFT LoRA layers at M = 1: the GEMV with the adapter's rank, and PEFT's logits
    (its own forward over the reference NF4Linear forward)."""
    from peft import LoraConfig, get_peft_model

    from qlora_kernels.patching.lora import patch_lora, unpatch_lora

    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    qk.quantize_model(model, compute_dtype=torch.float32, progress=False)  # the LoRA layers' bases
    model.eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: make the LoRA branch count
            nn.init.normal_(p, std=0.1)
    patched = patch_lora(model)
    ids = torch.tensor([[3]])
    with torch.no_grad():
        ours = model(ids).logits
        assert gemv_calls == [(1, 8)] * len(patched)
        del gemv_calls[:]
        model(torch.randint(0, 128, (1, 17)))  # 17 tokens: the tiled path
        assert gemv_calls == []
        unpatch_lora(model)
        monkeypatch.setattr(nf4_linear_module.NF4Linear, "forward", reference_forward)
        want = model(ids).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M", (1, 16, 17))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("dropout_p", (0.0, 0.1))
def test_lora_linear_takes_the_gemv_for_few_tokens_without_dropout(M, dtype, dropout_p, gemv_calls):
    """lora_linear over an NF4 base: the GEMV with the rank fused for M <= 16 without dropout,
    y and the gradients within twice the error of the same math in plain torch ops in dtype."""
    from qlora_kernels.reference import lora as ref

    layer = _layer(48, 96, dtype, True, True)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 96, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(8, 96, generator=g) * 0.1).to(dtype).requires_grad_()
    B = (torch.randn(48, 8, generator=g) * 0.1).to(dtype).requires_grad_()
    bias = layer.bias.detach().to(dtype)
    dy = torch.randn(M, 48, generator=g).to(dtype)
    torch.manual_seed(7)
    y = qk.lora_linear(x, layer, bias, A, B, 2.0, dropout_p=dropout_p)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    assert gemv_calls == ([(M, 8)] if M <= 16 and dropout_p == 0 else [])
    if dropout_p:  # the tiled path with its mask, whose values test_lora_cpu checks
        return
    W = layer.dequantize(dtype)
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    exact = ref.lora_linear(leaves[0], W.double(), bias.double(), leaves[1], leaves[2], 2.0)
    exact_grads = torch.autograd.grad(exact, leaves, dy.double())
    plain_leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    xp, Ap, Bp = plain_leaves
    plain = nn.functional.linear(xp, W, bias) + 2.0 * ((xp @ Ap.t()) @ Bp.t())
    plain_grads = torch.autograd.grad(plain, plain_leaves, dy)
    for name, got, want, low in zip(("y", "dx", "dA", "dB"), (y, *grads), (exact, *exact_grads),
                                    (plain, *plain_grads)):
        err = (got.double() - want).abs().max().item()
        err_plain = (low.double() - want).abs().max().item()
        assert err <= 2 * err_plain + 1e-6 * want.abs().max().item(), f"{name}: {err:.3g} vs plain {err_plain:.3g}"


# ---- inference without the op's dispatch ----

@pytest.fixture
def op_calls(monkeypatch):
    """Calls of the nf4_linear op made by NF4Linear."""
    from qlora_kernels.ops import nf4_linear as nf4_linear_ops

    calls = []
    real = nf4_linear_ops.nf4_linear

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(nf4_linear_ops, "nf4_linear", counting)
    return calls


@pytest.mark.parametrize("M", (1, 16, 17))
@pytest.mark.parametrize("context", ("no_grad", "inference_mode", "frozen input"))
def test_inference_skips_the_op_with_the_same_bits(M, context, op_calls, gemv_calls):
    """Without a gradient to compute, M <= 16 tokens go straight to the GEMV (no op dispatch) and
    give the op's bits; 17 tokens still run the op (its tiled path)."""
    layer = _layer(96, 128, torch.bfloat16, True, True)
    x = torch.randn(2, M, 128, dtype=torch.bfloat16)
    through_op = layer(x.requires_grad_()).detach()
    assert op_calls == [2 * M]
    x = x.detach()
    if context == "no_grad":
        with torch.no_grad():
            direct = layer(x)
    elif context == "inference_mode":
        with torch.inference_mode():
            direct = layer(x)
    else:
        layer.bias.requires_grad_(False)
        direct = layer(x)
    assert torch.equal(direct, through_op)
    assert op_calls == [2 * M] if 2 * M <= 16 else [2 * M, 2 * M]
    assert gemv_calls == ([(2 * M, 0)] * 2 if 2 * M <= 16 else [])


def test_a_gradient_wanted_takes_the_op(op_calls, gemv_calls):
    """A trainable bias or an input that wants a gradient keeps the op (its autograd)."""
    layer = _layer(32, 64, torch.float32, True, True)
    layer(torch.randn(1, 64)).sum().backward()
    assert layer.bias.grad is not None and op_calls == [1]
    x = torch.randn(1, 64, requires_grad=True)
    layer.bias.requires_grad_(False)
    layer(x).sum().backward()
    assert x.grad is not None and op_calls == [1, 1]
    assert len(gemv_calls) == 2  # both forwards still took the GEMV, through the op


def test_a_dispatch_mode_sees_the_op(op_calls):
    """A FLOP counter (any TorchDispatchMode) sees the op instead of a call it cannot intercept."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = _layer(32, 64, torch.float32, False, False)
    with torch.no_grad(), FlopCounterMode(display=False):
        layer(torch.randn(1, 64))
    assert op_calls == [1]
