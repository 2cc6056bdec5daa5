"""LoRA dropout draws its seed on the host at each call: a CUDA graph would replay one mask
forever, so a call with dropout refuses capture. No CUDA here: the capture query is faked."""

import pytest
import torch

import qlora_kernels as qk


def _args():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    return torch.randn(5, 32), linear.weight.detach(), linear.bias.detach(), torch.randn(4, 32), torch.randn(24, 4)


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_dropout_refuses_cuda_graph_capture(capturing):
    x, weight, bias, A, B = _args()
    with pytest.raises(RuntimeError, match=r"dropout \(dropout_p=0.1, training=True\) cannot be captured in a CUDA "
                                           r"graph.*every replay would reuse one dropout mask"):
        qk.lora_linear(x, weight, bias, A, B, 2.0, dropout_p=0.1)


def test_capture_without_dropout_computes_as_outside_capture(monkeypatch):
    x, weight, bias, A, B = _args()
    want = [qk.lora_linear(x, weight, bias, A, B, 2.0), qk.lora_linear(x, weight, bias, A, B, 2.0, 0.1, False)]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    got = [qk.lora_linear(x, weight, bias, A, B, 2.0), qk.lora_linear(x, weight, bias, A, B, 2.0, 0.1, False)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_patched_peft_layer_with_dropout_refuses_capture_in_training_only(capturing):
    from peft import LoraConfig, get_peft_model

    from qlora_kernels.patching.lora import patch_lora

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 24)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["0"]))
    assert patch_lora(model)
    x = torch.randn(3, 32)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        model(x)
    model.eval()
    assert model(x).shape == (3, 24)
