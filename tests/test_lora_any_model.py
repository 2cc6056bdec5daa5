"""LoRA fusion on any PEFT model: `patch(model, attention=False)` on encoders (BERT, DistilBERT)
and GPT-2 (its `Conv1D` layers, weight stored [in, out], fused through the transposed view),
after and before get_peft_model, against stock PEFT (fp32, LoRA dropout 0): outputs and the
LoRA weights' gradients, with the fused op's calls counted. The `cuda` parameters run on a CUDA
machine (`pytest -m gpu`)."""

import collections

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertModel, GPT2Config, \
    GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import qlora_kernels as qk
from qlora_kernels import reference as R
from qlora_kernels.backends import cuda as glue
from qlora_kernels.triton import lora as triton_lora

from helpers import DEVICES


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class OpCalls(TorchDispatchMode):
    """While active: `calls`, the qlora_kernels ops dispatched by name (below autograd, so the
    backward op too), and `weights`, the dense base weight each lora_linear_fwd call received."""

    def __init__(self):
        super().__init__()
        self.calls, self.weights = collections.Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "qlora_kernels":
            self.calls[name] += 1
            if name == "lora_linear_fwd" and args[1] is not None:
                self.weights.append(args[1])
        return func(*args, **(kwargs or {}))


# tiny random-init models, no dropout anywhere
def bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))


def distilbert():
    return DistilBertModel(DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


# each model, its PEFT task type (PEFT's task wrappers call the model's forward() directly, not
# through its hooks), its LoRA targets (every linear layer of the blocks; GPT-2's are all Conv1D)
# and how many layers they match
MODELS = {
    "bert": (bert, "SEQ_CLS", ["query", "key", "value", "dense"]),  # 6 per block, and the pooler's dense
    "distilbert": (distilbert, "FEATURE_EXTRACTION", ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]),
    "gpt2": (gpt2, "CAUSAL_LM", ["c_attn", "c_proj", "c_fc"]),  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
}
LORA_LAYERS = {"bert": 13, "distilbert": 12, "gpt2": 8}


def base_model(name, device="cpu"):
    torch.manual_seed(0)
    return MODELS[name][0]().float().train().to(device)


def add_lora(model, name):
    torch.manual_seed(1)
    _, task_type, targets = MODELS[name]
    model = get_peft_model(model, LoraConfig(task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=targets, fan_in_fan_out=name == "gpt2"))
    for pname, p in model.named_parameters():
        if "lora_B" in pname:  # PEFT starts B at 0: make the LoRA branch count
            nn.init.normal_(p, std=0.1)
    return model


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    return ids, mask


def output_and_grads(model, forward=None):
    """The model's output and the gradients of the trainable weights (LoRA's, and BERT's classifier
    that PEFT trains with them) under a loss touching every output; `forward` instead of model()."""
    model.zero_grad()
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in inputs())
    out = (forward or model)(input_ids=ids, attention_mask=mask)
    out = out.logits if "logits" in out else out.last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    return out.detach(), grads


def assert_like_stock(got, want):
    (out, grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def assert_fused_every_lora_layer(calls, name):
    # one forward and one backward: each LoRA layer ran the fused op once each way
    assert calls.calls["lora_linear_fwd"] == LORA_LAYERS[name] == calls.calls["lora_linear_bwd"], calls.calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_patch_without_attention_fuses_any_architecture(name, device):
    model = add_lora(base_model(name, device), name)
    want = output_and_grads(model)
    with OpCalls() as calls:
        stock = output_and_grads(model)
    assert not calls.calls  # stock PEFT: no qlora_kernels op
    assert_like_stock(stock, want)

    assert qk.patch(model, attention=False) is model
    report = qk.patch_report(model)
    assert report.attention is None and not report.skipped
    assert len(report.lora_layers) == LORA_LAYERS[name]
    with OpCalls() as calls:
        got = output_and_grads(model)
    assert_fused_every_lora_layer(calls, name)
    assert_like_stock(got, want)

    qk.unpatch(model)
    with OpCalls() as calls:
        assert_like_stock(output_and_grads(model), want)
    assert not calls.calls


# direct: the transformers model's forward() called as a method, which runs none of its own
# hooks (PEFT's AdaLoRA tuner calls it so)
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_patch_before_get_peft_model_fuses_any_architecture_at_first_forward(name, direct):
    want = output_and_grads(add_lora(base_model(name), name))
    base = qk.patch(base_model(name), attention=False)
    assert qk.patch_report(base).lora_pending
    model = add_lora(base, name)
    with OpCalls() as calls:
        got = output_and_grads(model, model.get_base_model().forward if direct else None)
    report = qk.patch_report(model)
    assert not report.lora_pending and len(report.lora_layers) == LORA_LAYERS[name]
    assert_fused_every_lora_layer(calls, name)
    assert_like_stock(got, want)


def test_unpatch_before_the_first_forward_removes_the_pending_fusion():
    base = qk.unpatch(qk.patch(base_model("bert"), attention=False))
    assert qk.patch_report(base) is None
    model = add_lora(base, "bert")
    with OpCalls() as calls:
        output_and_grads(model)
    assert not calls.calls  # stock PEFT: the hooks went with unpatch
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_conv1d_weight_goes_to_the_op_as_a_view():
    model = qk.patch(add_lora(base_model("gpt2"), "gpt2"), attention=False)
    conv_weights = {m.weight.data_ptr() for m in model.modules() if type(m) is Conv1D}
    assert len(conv_weights) == 8
    with OpCalls() as calls:
        output_and_grads(model)
    assert len(calls.weights) == 8
    for w in calls.weights:  # [out, in], the Conv1D's own storage transposed: not a copy
        assert w.data_ptr() in conv_weights and w.stride() == (1, w.shape[0]), (w.shape, w.stride())


def test_strict_error_for_attention_names_the_ways_out():
    model = add_lora(base_model("bert"), "bert")
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported") as error:
        qk.patch(model)
    assert "patch(model, attention=False)" in str(error.value) and "strict=False" in str(error.value)
    assert qk.patch_report(model) is None
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("M", [5, 40])
def test_cuda_backend_reads_a_transposed_dense_weight_in_place(M, monkeypatch):
    """bf16 below the dequantize-once token count takes the fused Triton kernels for a row-major W;
    a transposed one (a Conv1D's) goes to the torch GEMMs, which read it as it is. CPU tensors
    through Triton's interpreter here, CUDA ones on a CUDA machine."""
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernels would copy the transposed weight")

    monkeypatch.setattr(triton_lora, "lora_forward_triton", refuse)
    monkeypatch.setattr(triton_lora, "lora_backward_triton", refuse)
    monkeypatch.setattr(glue, "LORA_DEQUANT_ONCE_MIN_TOKENS", 64)
    torch.manual_seed(0)
    K, N, r = 32, 48, 4
    dtype = torch.bfloat16
    conv = torch.randn(K, N, device=DEVICE)  # stored [in, out]
    x, bias = torch.randn(M, K, device=DEVICE), torch.randn(N, device=DEVICE)
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    w = conv.to(dtype).t()
    args = (w, None, None, None, None, None, 0, 0)
    seed = torch.zeros(1, dtype=torch.int64)
    y, xa = glue.triton_lora_linear_fwd(x.to(dtype), *args, N, bias.to(dtype), A.to(dtype), B.to(dtype), 0.5, 0.0,
                                        seed)
    dy = torch.randn(M, N, device=DEVICE)
    dx, dA, dB, dbias = glue.triton_lora_linear_bwd(dy.to(dtype), x.to(dtype), *args, A.to(dtype), B.to(dtype), 0.5,
                                                    0.0, seed, xa)
    # fp64 reference on the bf16-rounded inputs; bf16 outputs within a few of their ulps
    xr, Ar, Br, br = (t.to(dtype).double().requires_grad_() for t in (x, A, B, bias))
    want = R.lora.lora_linear(xr, conv.to(dtype).double().t(), br, Ar, Br, 0.5)
    want.backward(dy.to(dtype).double())
    for got, ref in ((y, want), (dx, xr.grad), (dA, Ar.grad), (dB, Br.grad), (dbias, br.grad)):
        torch.testing.assert_close(got.double(), ref.detach(), atol=0.05, rtol=2e-2)
