"""The fused linear + cross-entropy op with each row kernel (C++; Triton, through the interpreter
without a GPU) against reference/loss.py: every option (ignore_index, all-ignored rows, label
smoothing, softcap, reductions, num_items_in_batch), chunk boundaries, weight and bias trainable
or frozen, gradients of hidden / weight / bias; fp32 tightly, fp16 / bf16 within twice the error
of the stock computation in that dtype. Bad inputs raise; no [tokens, vocab] tensor is made."""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qlora_kernels as qk  # noqa: E402
from helpers import grad_error  # noqa: E402
from qlora_kernels.backends.loss import cross_entropy_rows_cpu, cross_entropy_rows_triton  # noqa: E402
from qlora_kernels.ops import loss as loss_ops  # noqa: E402
from qlora_kernels.reference import loss as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = {"cpu": cross_entropy_rows_cpu, "triton": cross_entropy_rows_triton}
N, H, V = 37, 24, 53  # N not a multiple of the chunk


def _kernel(backend):
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the C++ kernel takes CPU tensors")
    return ROWS[backend]


def _inputs(dtype=torch.float32, n=N, vocab=V, ignore_every=5, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(vocab, H, generator=g) * H**-0.5 * 3
    bias = torch.randn(vocab, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return [t.to(device=device, dtype=dtype) for t in (hidden, weight, bias)] + [labels.to(device)]


def _fused(rows, hidden, weight, bias, labels, wants=(True, True, True), chunk_size=8, **opts):
    """(loss, {name: grad}) of the op's algorithm with the `rows` kernel, gradients as asked."""
    opts = dict(dict(ignore_index=-100, label_smoothing=0.0, softcap=0.0, reduction="mean",
                     num_items_in_batch=None), **opts)
    loss, dh, dw, db = loss_ops.run_chunks(rows, hidden, weight, bias, labels, None, opts["ignore_index"],
                                           opts["label_smoothing"], opts["softcap"], opts["reduction"],
                                           opts["num_items_in_batch"], chunk_size, wants[0], wants[1],
                                           wants[2] and bias is not None)
    grads = {name: g for name, g, want in (("hidden", dh, wants[0]), ("weight", dw, wants[1]), ("bias", db, wants[2]))
             if want and g.numel()}
    return loss, grads


def _reference(hidden, weight, bias, labels, wants=(True, True, True), softcap=0.0, **opts):
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {n: t.detach().requires_grad_(want) if t is not None else None
              for (n, t), want in zip(leaves.items(), wants)}
    loss = ref.linear_cross_entropy(leaves["hidden"], leaves["weight"], labels, leaves["bias"], softcap=softcap or None,
                                    **opts)
    asked = {n: t for n, t in leaves.items() if t is not None and t.requires_grad}
    grads = dict(zip(asked, torch.autograd.grad(loss.sum(), list(asked.values()), allow_unused=True)))
    return loss.detach(), grads


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(softcap=2.0),
    dict(softcap=2.0, label_smoothing=0.25),
    dict(reduction="sum"),
    dict(reduction="sum", softcap=1.5, label_smoothing=0.1),
    dict(num_items_in_batch=17.0),
    dict(num_items_in_batch=17.0, softcap=3.0, label_smoothing=0.05),
    dict(ignore_index=7),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fp32_every_option_matches_reference(backend, opts):
    hidden, weight, bias, labels = _inputs()
    if "ignore_index" in opts:
        labels = torch.where(labels == -100, opts["ignore_index"], labels)
    loss, grads = _fused(_kernel(backend), hidden, weight, bias, labels, **opts)
    exp_loss, exp_grads = _reference(hidden, weight, bias, labels, **opts)
    torch.testing.assert_close(loss, exp_loss, rtol=2e-6, atol=2e-6)
    assert grads.keys() == exp_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], exp_grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 0])
def test_chunk_boundaries_and_frozen_weight(backend, chunk_size):
    hidden, weight, bias, labels = _inputs()
    wants = (True, False, False)
    loss, grads = _fused(_kernel(backend), hidden, weight, None, labels, wants=wants, chunk_size=chunk_size,
                         label_smoothing=0.1)
    exp_loss, exp_grads = _reference(hidden, weight, None, labels, wants=wants, label_smoothing=0.1)
    torch.testing.assert_close(loss, exp_loss, rtol=2e-6, atol=2e-6)
    assert grads.keys() == {"hidden"}
    torch.testing.assert_close(grads["hidden"], exp_grads["hidden"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("vocab", [1, 4096, 4099])
def test_rows_kernel_vocab_one_and_past_one_block(backend, vocab):
    # 4096 is the Triton kernel's largest block: 4099 takes a second, masked block
    rows = _kernel(backend)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, vocab, generator=g) * 4).to(DEVICE)
    labels = torch.tensor([0, vocab - 1, -100, vocab // 2, 0], device=DEVICE)
    for softcap, smoothing in ((0.0, 0.0), (2.5, 0.1)):
        ours, expected = logits.clone(), logits.clone()
        loss = rows(ours, labels, -100, smoothing, softcap, 0.5, True)
        exp_loss = ref.cross_entropy_rows(expected, labels, -100, smoothing, softcap, 0.5)
        torch.testing.assert_close(loss, exp_loss, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
        untouched = logits.clone()
        torch.testing.assert_close(rows(untouched, labels, -100, smoothing, softcap, 1.0, False), exp_loss,
                                   rtol=2e-6, atol=2e-6)
        assert torch.equal(untouched, logits)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored(backend, reduction):
    hidden, weight, bias, labels = _inputs()
    labels[:] = -100
    loss, grads = _fused(_kernel(backend), hidden, weight, bias, labels, reduction=reduction)
    exp_loss, _ = _reference(hidden, weight, bias, labels, reduction=reduction)
    torch.testing.assert_close(loss, exp_loss, equal_nan=True)  # NaN mean, as torch
    assert all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(softcap=2.0, label_smoothing=0.1), dict(num_items_in_batch=20.0)],
                         ids=["default", "softcap+smoothing", "num_items"])
def test_half_precision_within_twice_stocks_error(backend, dtype, opts):
    hidden, weight, bias, labels = _inputs(dtype)
    loss, grads = _fused(_kernel(backend), hidden, weight, bias, labels, **opts)
    stock_loss, stock_grads = _reference(hidden, weight, bias, labels, **opts)
    exact_loss, exact_grads = _reference(*(t.double() for t in (hidden, weight, bias)), labels, **opts)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads.values())
    err, stock_err = (loss.double() - exact_loss).abs(), (stock_loss.double() - exact_loss).abs()
    assert err <= 2 * stock_err + 1e-4, (err, stock_err)
    for name in exact_grads:
        ours_e, stock_e = grad_error({0: grads[name]}, {0: exact_grads[name]}), \
            grad_error({0: stock_grads[name]}, {0: exact_grads[name]})
        assert ours_e <= 2 * stock_e + 1e-3, (name, ours_e, stock_e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_function_autograd(dtype, reduction):
    """Through qk.fused_linear_cross_entropy (the registered kernel): [B, S, H] input, gradients to
    hidden / weight / bias (non-contiguous hidden), scaled by the incoming gradient."""
    hidden, weight, bias, labels = _inputs(dtype, n=2 * 18)
    hidden = hidden.view(18, 2, H).transpose(0, 1)  # [2, 18, H], not contiguous
    labels = labels.view(2, 18)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    loss = qk.fused_linear_cross_entropy(*leaves[:2], labels, leaves[2], reduction=reduction, label_smoothing=0.1,
                                         chunk_size=7)
    assert loss.shape == ((2, 18) if reduction == "none" else ())
    upstream = torch.rand_like(loss) + 0.5
    got = torch.autograd.grad(loss, leaves, upstream)
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    exp = ref.linear_cross_entropy(exact[0].reshape(-1, H), exact[1], labels.reshape(-1), exact[2],
                                   reduction=reduction, label_smoothing=0.1)
    exp = exp.view(loss.shape)
    want = torch.autograd.grad(exp, exact, upstream.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(loss.double(), exp.detach(), **tol)
    for g, w, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        torch.testing.assert_close(g.double(), w, **tol)


class _Recorder(TorchDispatchMode):
    """The aten ops run and the largest tensor any of them returned (bytes)."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(func.overloadpacket.__name__)
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            # views and in-place results are no new memory
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_gradients_only_when_something_requires_grad(monkeypatch):
    """The public function asks the op for exactly the gradients autograd will want."""
    asked = []
    op = loss_ops.linear_cross_entropy

    def spy(*args):
        asked.append(args[-3:])
        return op(*args)

    monkeypatch.setattr(loss_ops, "linear_cross_entropy", spy)
    hidden, weight, bias, labels = _inputs()
    with torch.no_grad():
        qk.fused_linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels, bias)
    qk.fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels, bias)
    qk.fused_linear_cross_entropy(hidden, weight.detach(), labels, bias)
    qk.fused_linear_cross_entropy(hidden.detach(), weight, labels, bias.requires_grad_())
    assert asked == [(False, False, False), (False, False, False), (True, False, False), (False, True, True)]


def test_loss_only_runs_one_gemm_per_chunk():
    hidden, weight, _, labels = _inputs()
    for wants, mms in (((False, False, False), 4), ((True, False, False), 8), ((True, True, False), 12)):
        with _Recorder() as rec:
            loss_ops.run_chunks(cross_entropy_rows_cpu, hidden, weight, None, labels, None, -100, 0.0, 0.0, "mean",
                                None, 10, *wants)
        assert rec.ops.count("mm") + rec.ops.count("addmm_") == mms, rec.ops


def test_weight_gradient_only_when_weight_requires_grad():
    hidden, weight, bias, labels = _inputs()
    hidden.requires_grad_()
    bias.requires_grad_()
    loss = qk.fused_linear_cross_entropy(hidden, weight, labels, bias)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None


@pytest.mark.parametrize("vocab", [2000, 16000])
def test_memory_does_not_grow_with_the_vocabulary(vocab, monkeypatch):
    """With the weight frozen, no tensor made by the op exceeds one chunk's fp32 logits (64 KiB
    budget here) or grad_hidden, at any vocabulary; the stock loss makes [tokens, vocab] fp32."""
    monkeypatch.setattr(loss_ops, "CHUNK_BYTES", 64 * 1024)
    n = 256
    hidden, weight, _, labels = _inputs(n=n, vocab=vocab, ignore_every=0)
    with _Recorder() as rec:  # the op's algorithm, so that the recorder sees every tensor it makes
        loss_ops.run_chunks(cross_entropy_rows_cpu, hidden, weight, None, labels, None, -100, 0.0, 0.0, "mean", None,
                            0, True, False, False)
    assert rec.largest <= max(64 * 1024 + 4 * vocab, n * H * 4), rec.largest
    with _Recorder() as stock:
        ref.linear_cross_entropy(hidden.requires_grad_(), weight, labels).backward()
    assert stock.largest >= n * vocab * 4


def _bad(**changes):
    hidden, weight, bias, labels = _inputs()
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(labels=torch.full((N,), V)), "labels must be in"),
    (dict(labels=torch.full((N,), -5)), "labels must be in"),
    (dict(labels=torch.zeros(N, dtype=torch.int32)), "int64"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.int64)), "leading shape"),
    (dict(weight=torch.randn(V, H + 1)), "hidden_size"),
    (dict(weight=torch.randn(V, H, dtype=torch.float64)), "dtype"),
    (dict(hidden=torch.randn(N, H, dtype=torch.float64), weight=torch.randn(V, H, dtype=torch.float64),
          bias=None), "float32, float16 or bfloat16"),
    (dict(bias=torch.randn(V + 1)), "bias must be"),
    (dict(weight=torch.randn(V, H, device="meta")), "meta"),
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(softcap=-1.0), "softcap"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(num_items_in_batch=0), "num_items_in_batch"),
])
def test_bad_inputs_raise_clear_errors(changes, message):
    args = _bad(**{k: v for k, v in changes.items() if k in ("hidden", "weight", "labels", "bias")})
    opts = {k: v for k, v in changes.items() if k not in args}
    if DEVICE != "cpu":
        args = {k: v.to(DEVICE) if v is not None and v.device.type == "cpu" else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        qk.fused_linear_cross_entropy(args["hidden"], args["weight"], args["labels"], args["bias"], **opts)


def test_raw_op_refuses_a_gradient_it_did_not_compute():
    hidden, weight, _, labels = _inputs()
    hidden.requires_grad_()
    loss, *_ = loss_ops.linear_cross_entropy(hidden, weight, None, labels, None, -100, 0.0, 0.0, "mean", None, 0,
                                             False, False, False)
    with pytest.raises(RuntimeError, match="grad_hidden=False"):
        loss.backward()


def test_opcheck():
    hidden, weight, bias, labels = _inputs(n=9)
    for reduction in ("mean", "none"):
        args = (hidden.requires_grad_(), weight, bias, labels, None, -100, 0.1, 2.0, reduction, None, 4, True, False,
                False)
        torch.library.opcheck(loss_ops.linear_cross_entropy, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_finite_logits_propagate_as_torch(backend):
    rows = _kernel(backend)
    logits = torch.randn(3, 40, device=DEVICE)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    labels = torch.tensor([1, 2, 3], device=DEVICE)
    ours, expected = logits.clone(), logits.clone()
    loss = rows(ours, labels, -100, 0.0, 0.0, 1.0, True)
    exp = ref.cross_entropy_rows(expected, labels, -100, 0.0, 0.0, 1.0)
    torch.testing.assert_close(loss, exp, equal_nan=True)
    assert loss[:2].isnan().all() and loss[2].isfinite()
