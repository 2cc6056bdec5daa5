"""NF4Linear vs bitsandbytes' Linear4bit: same state dict, loads both ways, same outputs."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.nn import Params4bit
from torch import nn

import qlora_kernels as qk
from qlora_kernels.bnb_state_dict import CheckpointError


def _linear4bit(linear, quant_storage=torch.uint8, double_quant=True, compute_dtype=torch.bfloat16):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                              quant_storage=quant_storage)
    layer.load_state_dict(linear.state_dict())
    # Linear4bit is built in fp32: keep the source dtype, as a model loaded in bf16 would
    layer.weight.data = layer.weight.data.to(linear.weight.dtype)
    if linear.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data.to(linear.bias.dtype))
    return layer.to("cpu")  # quantizes


def _linear4bit_from_state_dict(sd, in_features, out_features, compute_dtype=torch.bfloat16):
    """What stock transformers does with a bitsandbytes checkpoint: Params4bit.from_prequantized."""
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in sd, compute_dtype=compute_dtype,
                              quant_type="nf4", quant_storage=sd["weight"].dtype)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"])
    return layer


def _assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_is_linear4bits(dtype, quant_storage, double_quant):
    linear = nn.Linear(192, 72).to(dtype)
    ours = qk.NF4Linear.from_linear(linear, double_quant=double_quant, quant_storage=quant_storage)
    theirs = _linear4bit(linear, quant_storage, double_quant)
    _assert_same_state_dict(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_loads_both_ways_and_gives_the_same_outputs(compute_dtype):
    linear = nn.Linear(256, 96)
    theirs = _linear4bit(linear, compute_dtype=compute_dtype)
    x = torch.randn(3, 7, 256)  # 21 tokens: W in dequantized tiles, F.linear's bits (the GEMV's below)

    # bitsandbytes -> ours: a fresh NF4Linear (of other weights) loads Linear4bit's state dict
    ours = qk.NF4Linear.from_linear(nn.Linear(256, 96), compute_dtype=compute_dtype)
    ours.load_state_dict(theirs.state_dict())
    _assert_same_state_dict(ours.state_dict(), theirs.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))

    # ours -> bitsandbytes
    back = _linear4bit_from_state_dict(ours.state_dict(), 256, 96, compute_dtype)
    _assert_same_state_dict(back.state_dict(), ours.state_dict())
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))
        # one token: the GEMV, whose fp32 sums run in another order
        tol = dict(rtol=1e-5, atol=1e-5) if compute_dtype == torch.float32 else {}
        torch.testing.assert_close(back(x[:1, :1]), ours(x[:1, :1]), **tol)


@pytest.mark.parametrize("M", [4, 20])  # the GEMV, the dequantized tiles
def test_forward_is_dequantize_then_linear(M):
    linear = nn.Linear(128, 64)
    layer = qk.NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(M, 128)
    w = qk.nf4_dequantize(layer.weight, layer.quant_state)
    torch.testing.assert_close(layer(x), x @ w.t() + linear.bias, rtol=1e-5, atol=1e-5)
    assert (w - linear.weight).abs().max() < 0.5 * linear.weight.abs().max()


def test_dtype_casts_never_touch_the_quantized_bytes():
    layer = qk.NF4Linear.from_linear(nn.Linear(128, 64), quant_storage=torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    layer.to(torch.float32)
    after = layer.state_dict()
    for k, v in before.items():
        if k == "bias":
            continue
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
    assert after["bias"].dtype == torch.float32


def test_parameters_and_grads():
    layer = qk.NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is not None and layer.weight.grad is None


# --- bad checkpoints: a clear error, and the layer is left as it was -----------------------

def _good():
    return qk.NF4Linear.from_linear(nn.Linear(128, 64)).state_dict()


def _truncate(key, n=1):
    def corrupt(sd):
        sd[key] = sd[key][:-n]
    return corrupt


def _set(key, value):
    def corrupt(sd):
        sd[key] = value
    return corrupt


def _json(text):
    return _set("weight.quant_state.bitsandbytes__nf4", torch.tensor(list(text.encode()), dtype=torch.uint8))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_truncate("weight"), "truncated"),
        (_truncate("weight.absmax"), "absmax has 127 elements, expected 128"),
        (_truncate("weight.nested_absmax"), "nested_absmax"),
        (_truncate("weight.quant_state.bitsandbytes__nf4", 5), "corrupted or truncated"),
        (lambda sd: sd.pop("weight.nested_quant_map"), "nested_quant_map"),
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "quant_state"),
        (_set("weight.quant_map", torch.linspace(-1, 1, 16)), "not the NF4 codebook"),
        (_set("weight.absmax", torch.zeros(128, dtype=torch.float32)), "dtype"),
        (_json('{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [64, 128], '
               '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}'), "blocksize=48"),
        (_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 128], '
               '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}'), "mismatched"),
        (_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [64, 128]}'), "dtype"),
        (_json('[1, 2]'), "not an object"),
        (_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": "64x128"}'), "must be a list"),
        (_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 128.0], '
               '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}'), "sequence of ints"),
        (_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [-64, -128], '
               '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}'), "negative size"),
        (_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 128], '
               '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": NaN}'), "finite"),
        (_json('{"__class__": "os.system", "quant_type": "nf4"}'), "blocksize"),
    ],
)
def test_bad_checkpoint_raises_and_leaves_layer_intact(corrupt, match):
    layer = qk.NF4Linear.from_linear(nn.Linear(128, 64))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = _good()
    corrupt(sd)
    with pytest.raises(CheckpointError, match=match):
        layer.load_state_dict(sd)
    _assert_same_state_dict(layer.state_dict(), before)


def test_fp4_checkpoint_is_refused():
    linear = nn.Linear(128, 64)
    fp4 = bnb.nn.Linear4bit(128, 64, quant_type="fp4")
    fp4.load_state_dict(linear.state_dict())
    fp4 = fp4.to("cpu")
    layer = qk.NF4Linear.from_linear(linear)
    with pytest.raises(NotImplementedError, match="FP4"):
        layer.load_state_dict(fp4.state_dict())


def test_load_shape_mismatch_names_both_shapes():
    layer = qk.NF4Linear.from_linear(nn.Linear(128, 64))
    sd = qk.NF4Linear.from_linear(nn.Linear(128, 32)).state_dict()
    with pytest.raises(CheckpointError, match=r"\(32, 128\).*\(64, 128\)"):
        layer.load_state_dict(sd)
