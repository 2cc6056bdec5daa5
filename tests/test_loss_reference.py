"""reference/loss.py against transformers' causal-LM loss and torch's cross_entropy: the spec
means what transformers computes (ForCausalLMLoss after the shift, fixed_cross_entropy with and
without num_items_in_batch, Gemma2's final logit softcap in the model's dtype), and the row
function's gradient is autograd's."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from qlora_kernels.reference.loss import cross_entropy_rows, linear_cross_entropy

N, H, V = 29, 16, 37


def _inputs(dtype=torch.float32, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignore_every] = -100
    return hidden, weight, bias, labels


def _transformers_loss(hidden, weight, labels, bias=None, softcap=None, **kwargs):
    """What a *ForCausalLM computes from unshifted labels [1, N + 1] and hidden [1, N + 1, H]."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:  # Gemma2ForCausalLM.forward, in the logits' dtype
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, V, **kwargs)


def _unshifted(hidden, labels):
    # position t predicts label t + 1: prepend a label the shift drops, append a hidden state
    # whose target is the padding the shift adds
    return torch.cat([hidden, hidden[:1]])[None], torch.cat([labels[:1], labels])[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_matches_transformers_causal_lm_loss(dtype, num_items, softcap):
    hidden, weight, bias, labels = _inputs(dtype)
    if num_items == "tensor":
        num_items = torch.tensor(11)
    ours = linear_cross_entropy(hidden, weight, labels, bias, softcap=softcap, num_items_in_batch=num_items)
    h, y = _unshifted(hidden, labels)
    stock = _transformers_loss(h, weight, y, bias, softcap=softcap, num_items_in_batch=num_items)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


def test_ignore_index_and_shift_labels_as_transformers():
    hidden, weight, _, labels = _inputs(ignore_every=3)
    labels = torch.where(labels == -100, -1, labels)
    ours = linear_cross_entropy(hidden, weight, labels, ignore_index=-1)
    stock = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight)[None], None, V, ignore_index=-1,
                            shift_labels=labels[None])
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_reductions_and_smoothing_are_torch_cross_entropy(reduction, label_smoothing):
    hidden, weight, bias, labels = _inputs()
    ours = linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, label_smoothing=label_smoothing)
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    stock = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


def test_every_label_ignored_gives_nan_mean_and_zero_sum():
    hidden, weight, _, labels = _inputs()
    labels[:] = -100
    assert linear_cross_entropy(hidden, weight, labels).isnan()
    assert linear_cross_entropy(hidden, weight, labels, reduction="sum") == 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_rows_loss_and_gradient_are_autograds(label_smoothing, softcap):
    _, _, _, labels = _inputs()
    logits = torch.randn(N, V, dtype=torch.float64) * 3
    x = logits.clone().requires_grad_()
    z = softcap * torch.tanh(x / softcap) if softcap else x
    expected = torch.nn.functional.cross_entropy(z, labels, reduction="none", label_smoothing=label_smoothing)
    (expected.sum() * 0.25).backward()
    work = logits.clone()
    loss = cross_entropy_rows(work, labels, -100, label_smoothing, softcap, scale=0.25)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(work, x.grad)
    assert (work[labels == -100] == 0).all() and (loss[labels == -100] == 0).all()
    # without compute_grad the logits stay
    again = logits.clone()
    cross_entropy_rows(again, labels, -100, label_smoothing, softcap, compute_grad=False)
    assert torch.equal(again, logits)
