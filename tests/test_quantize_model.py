"""quantize_model / from_bnb on a small random Llama: checkpoints that stock transformers +
bitsandbytes load, and conversion that shares the bytes."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import qlora_kernels as qk


# bitsandbytes' Linear4bit, in eval mode under no_grad on a CPU with AVX512-BF16, repacks
# its weight into a CPU layout with bf16 absmax (other numbers, and no longer the checkpoint
# format). Stock models are therefore run in train mode (Llama has no dropout by default),
# which is the plain dequantize + matmul path the format defines.


def tiny_llama(dtype=torch.float32):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def _weights(model):
    return {k: v for k, v in model.state_dict().items()}


def _assert_same_bytes(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_quantize_model_replaces_linears_but_lm_head_and_skips(tmp_path):
    model = tiny_llama()
    qk.quantize_model(model, skip_modules=["mlp.down_proj"], progress=False)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear
    assert kinds["model.layers.0.mlp.down_proj"] is nn.Linear
    assert kinds["model.layers.1.self_attn.q_proj"] is qk.NF4Linear
    assert sum(t is qk.NF4Linear for t in kinds.values()) == 2 * 6
    qc = model.config.quantization_config
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_saved_checkpoint_loads_in_stock_transformers_bitsandbytes(tmp_path, quant_storage):
    model = tiny_llama()
    qk.quantize_model(model, compute_dtype=torch.float32, quant_storage=quant_storage, progress=False)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = model(ids).logits
    model.save_pretrained(tmp_path)

    stock = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").train()
    assert isinstance(stock.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    _assert_same_bytes(_weights(stock), _weights(model))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours)


def test_from_bnb_shares_bytes_and_gives_the_same_logits(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu").train()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    bnb_sd = {k: v.clone() for k, v in _weights(model).items()}
    q_proj = model.model.layers[0].self_attn.q_proj
    ptrs = (q_proj.weight.data_ptr(), q_proj.weight.quant_state.absmax.data_ptr())

    qk.from_bnb(model, progress=False)
    ours = model.model.layers[0].self_attn.q_proj
    assert isinstance(ours, qk.NF4Linear)
    assert (ours.weight.data_ptr(), ours.absmax.data_ptr()) == ptrs  # shared, not copied
    assert ours.weight.dtype == torch.bfloat16
    _assert_same_bytes(_weights(model), bnb_sd)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_bad_checkpoint_leaves_the_whole_model_untouched():
    model = tiny_llama()
    qk.quantize_model(model, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in sd:  # new values for every layer, and the last NF4 weight truncated
        if k.endswith("proj.weight") or k.endswith("norm.weight"):
            sd[k] = sd[k].flip(0)
    sd["model.layers.1.mlp.down_proj.weight.absmax"] = sd["model.layers.1.mlp.down_proj.weight.absmax"][:-3]
    with pytest.raises(ValueError, match="down_proj.weight.*absmax has 125 elements"):
        model.load_state_dict(sd)
    _assert_same_bytes(_weights(model), before)


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_opt_and_bloom_round_trip_through_stock_bitsandbytes(tmp_path, family):
    from transformers import BloomConfig, BloomForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    else:
        model = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4,
                                             hidden_dropout=0.0, attention_dropout=0.0))
    qk.quantize_model(model, compute_dtype=torch.float32, progress=False)
    assert sum(isinstance(m, qk.NF4Linear) for m in model.modules()) == 2 * (6 if family == "opt" else 4)
    ids = torch.randint(0, 256, (2, 10))
    model.train()  # dropout is 0: train mode is the plain path (see the note at the top)
    with torch.no_grad():
        ours = model(ids).logits
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").train()
    _assert_same_bytes(_weights(stock), _weights(model))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours)
