"""torch.compile(fullgraph=True) traces forward + backward through the custom ops (fake
implementations and registered autograd), without graph breaks."""

import torch

import qlora_kernels as qk


def test_flash_attention_compiles_fullgraph_fwd_bwd():
    q = torch.randn(2, 4, 16, 32, requires_grad=True)
    k = torch.randn(2, 2, 16, 32, requires_grad=True)
    v = torch.randn(2, 2, 16, 32, requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, :3] = False

    def loss(q, k, v):
        return qk.flash_attention(q, k, v, key_padding_mask=mask).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_lora_linear_compiles_fullgraph_fwd_bwd_dense_and_nf4():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    nf4 = qk.NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(3, 7, 64, requires_grad=True)
    A = torch.randn(8, 64, requires_grad=True)
    B = torch.randn(48, 8, requires_grad=True)
    for weight in (linear.weight.detach(), nf4):
        def loss(x, A, B):
            return qk.lora_linear(x, weight, linear.bias, A, B, 2.0, dropout_p=0.1).square().sum()

        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        torch.manual_seed(5)  # same seed, same dropout mask in both runs
        got = torch.autograd.grad(compiled(x, A, B), (x, A, B))
        torch.manual_seed(5)
        want = torch.autograd.grad(loss(x, A, B), (x, A, B))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_nf4_linear_compiles_fullgraph_fwd_bwd():
    """NF4Linear's op pair traced whole at decode and prefill sizes (M = 1 on the GEMV, 21 on the tiles)."""
    torch.manual_seed(0)
    layer = qk.NF4Linear.from_linear(torch.nn.Linear(64, 48), compute_dtype=torch.float32)
    for shape in ((1, 64), (3, 7, 64)):
        x = torch.randn(shape, requires_grad=True)

        def loss(x):
            return layer(x).square().sum()

        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(x), (x, layer.bias))
        want = torch.autograd.grad(loss(x), (x, layer.bias))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
