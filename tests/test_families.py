"""Every model family `patch` knows, on a small random-init fp32 model, against stock
transformers (SDPA, eager for Gemma2): loss and gradients with left-,
right- and no padding (labels masked at the pads), greedy generation of a left-padded batch
with a KV cache, packed sequences against one run per document, a PEFT LoRA adapter, and a
bitsandbytes NF4 base. The windowed families get sequences longer than their window, Gemma2 a
softcap small enough to matter; the attention keyword arguments that are not in the kernels
take SDPA with one warning, or raise under strict."""

import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import sliding_window_overlay

import qlora_kernels as qk
from qlora_kernels.patching import SUPPORTED, patch_attention, unpatch_attention
from qlora_kernels.patching import attention as patched_attention
from qlora_kernels.reference.attention import keep_mask

WINDOW = 5
SEQ = 16  # longer than WINDOW: the window drops keys
VOCAB = 128
_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, initializer_range=0.2, tie_word_embeddings=False)
CONFIGS = {
    "llama": dict(_SHAPE),
    "mistral": dict(_SHAPE, sliding_window=WINDOW),
    # layers from max_window_layers on slide: layer 0 full, layer 1 windowed
    "qwen2": dict(_SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(_SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma": dict(_SHAPE),
    "gemma2": dict(_SHAPE, sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=None,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(_SHAPE, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=16),
    "phi3": dict(_SHAPE, sliding_window=WINDOW),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, init_std=0.2),
}
FAMILIES = list(CONFIGS)
WINDOWED = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


# Gemma2's stock attention is eager: transformers 5.24 picks it (its SDPA refuses softcap),
# 5.17 picks SDPA, which leaves the softcap out
STOCK_ATTENTION = {"gemma2": "eager"}


def build(family, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**CONFIGS[family], **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation=STOCK_ATTENTION.get(family)).float()


@pytest.fixture(scope="module")
def models():
    """One stock model per family, built once: each test patches it and unpatches it again."""
    return {}


def stock(models, family):
    if family not in models:
        models[family] = build(family)
    return models[family]


@pytest.fixture
def patched(models):
    """patched(family): the shared stock model with its attention patched for this test."""
    done = []

    def get(family):
        model = stock(models, family)
        assert patch_attention(model)
        done.append(model)
        return model

    yield get
    for model in done:
        unpatch_attention(model)


def padded_batch(padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :9] = 0  # more pads than the window
    elif padding == "right":
        mask[1, -4:] = 0
        mask[2, -9:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def loss_and_grads(model, ids, mask):
    model.train()
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # qlora_kernels.patch's fused loss returns no logits when training with labels
    return None if out.logits is None else out.logits.detach(), out.loss.detach(), grads


def test_registry_lists_every_family():
    assert set(FAMILIES) | {"bloom"} <= set(SUPPORTED)
    for family in FAMILIES:
        assert build(family).config.model_type == family


@pytest.mark.parametrize("sliding_window", [1, 3, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_window_size_is_transformers_sliding_window(sliding_window, causal):
    # transformers' masks: kv_idx > q_idx - W under a causal mask, |q_idx - kv_idx| < W in
    # Gemma3's bidirectional layers (the kernels' windows are bottom-right aligned: the 4 keys
    # before the queries are cached ones)
    from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

    q, kv = torch.arange(8)[:, None] + 4, torch.arange(12)[None, :]
    if causal:
        expected = sliding_window_overlay(sliding_window)(0, 0, q, kv) & (kv <= q)
    else:
        expected = _bidirectional_window_overlay(sliding_window)(0, 0, q, kv)
    assert torch.equal(keep_mask(8, 12, causal, patched_attention.window_size(sliding_window)), expected)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_gemma3_bidirectional_window_matches_stock(padding):
    model = build("gemma3_text", use_bidirectional_attention=True)
    ids, mask = padded_batch(padding)
    want_logits, want_loss, want_grads = loss_and_grads(model, ids, mask)
    assert patch_attention(model)
    logits, loss, grads = loss_and_grads(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], want_logits[keep], atol=2e-5, rtol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=5e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_window_size_refuses_what_is_not_a_window(bad):
    with pytest.raises(ValueError, match="sliding_window"):
        patched_attention.window_size(bad)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_stock(models, patched, family, padding):
    ids, mask = padded_batch(padding)
    want_logits, want_loss, want_grads = loss_and_grads(stock(models, family), ids, mask)
    logits, loss, grads = loss_and_grads(patched(family), ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], want_logits[keep], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, want_loss, atol=2e-6, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=5e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("replaced", ["eager", "sdpa"])
def test_left_pads_get_what_the_replaced_attention_gives_them(replaced):
    # the last left pad predicts the first token, so the loss sees the pads' rows: eager's
    # mean of the values, SDPA's 0
    model = build("mistral")
    model.set_attn_implementation(replaced)
    ids, mask = padded_batch("left")
    want_logits, want_loss, want_grads = loss_and_grads(model, ids, mask)
    patch_attention(model)
    logits, loss, grads = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-4)  # the pads' too
    torch.testing.assert_close(loss, want_loss, atol=2e-6, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=5e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_of_a_left_padded_batch(models, patched, family):
    ids, mask = padded_batch("left", seed=1)
    ids, mask = ids[:, 4:], mask[:, 4:]  # prompts of 12, 12 and 7 tokens; the output crosses the window

    def generate(model):
        model.eval()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.scores)

    want_tokens, want_scores = generate(stock(models, family))
    tokens, scores = generate(patched(family))
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(scores, want_scores, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("collator", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_match_one_run_per_document(models, patched, family, collator, monkeypatch):
    lengths = [9, 4, 12]  # two longer than the window
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    model = stock(models, family).eval()
    kwargs = dict(position_ids=torch.cat([torch.arange(n) for n in lengths])[None])
    if collator:  # what TRL's padding-free collator adds
        offsets = torch.tensor([0, 9, 13, 25], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=12, max_length_k=12,
                      seq_idx=torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].int())
    monkeypatch.setattr(patched_attention, "_sdpa_fallback", None)  # the kernels compute every call
    with torch.no_grad():
        want = torch.cat([model(d[None]).logits[0] for d in docs])
        got = patched(family).eval()(torch.cat(docs)[None], **kwargs).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_patched_after_get_peft_model(models, family):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        model = copy.deepcopy(stock(models, family))
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0: make the adapter count
                torch.nn.init.normal_(p, std=0.05)
        return model

    ids, mask = padded_batch("left")
    _, want_loss, want_grads = loss_and_grads(lora_model(), ids, mask)
    model = qk.patch(lora_model())
    report = qk.patch_report(model)
    assert report.family == family and report.attention and report.lora_layers
    _, loss, grads = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss, want_loss, atol=2e-6, rtol=1e-5)
    assert grads.keys() == want_grads.keys() and any("lora_A" in name for name in grads)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=5e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_bitsandbytes_nf4_with_lora(models, family, tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    stock(models, family).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)

    def qlora_model():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32,
                                                     attn_implementation=STOCK_ATTENTION.get(family))
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        # bitsandbytes repacks its CPU weights in eval mode: stay in train mode
        return model.train()

    ids, mask = padded_batch("left")
    _, want_loss, want_grads = loss_and_grads(qlora_model(), ids, mask)
    model = qk.patch(qlora_model())
    assert qk.patch_report(model).converted  # Linear4bit -> NF4Linear, same bytes
    _, loss, grads = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-4, rtol=1e-3, msg=name)


# --- what the kernels do not implement ---------------------------------------------------

def _attention_call(heads=4, kv_heads=2, seq=SEQ):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, seq, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, seq, 16, generator=g) for _ in range(2))
    return q, k, v


@pytest.fixture
def attention_module(models):
    model = stock(models, "mistral")
    module = model.model.layers[0].self_attn
    yield module
    patched_attention.clear_strict(model)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(patched_attention, "_WARNED", set())


def _sdpa(module, q, k, v, mask=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


@pytest.mark.parametrize("case", ["dropout", "output_attentions", "unknown keyword", "4-D mask"])
def test_what_the_kernels_lack_takes_sdpa_with_one_warning(attention_module, fresh_warnings, case):
    q, k, v = _attention_call()
    kwargs, mask = dict(scaling=0.25, sliding_window=WINDOW), None
    keep = keep_mask(SEQ, SEQ, True, (WINDOW - 1, WINDOW - 1)).view(1, 1, SEQ, SEQ)
    if case == "dropout":
        kwargs["dropout"] = 0.5
    elif case == "output_attentions":
        kwargs["output_attentions"] = True
    elif case == "unknown keyword":
        kwargs["attention_temperature"] = 2.0
    else:
        mask = keep.expand(2, 1, SEQ, SEQ).clone()
        mask[1, :, :, :3] = False
    expected_reason = {"dropout": "attention dropout", "output_attentions": "output_attentions",
                       "unknown keyword": "'attention_temperature'", "4-D mask": "4-D attention mask"}[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(5)
        out, _ = patched_attention.attention_forward(attention_module, q, k, v, mask, **kwargs)
        patched_attention.attention_forward(attention_module, q, k, v, mask, **kwargs)
    messages = [str(w.message) for w in caught if "qlora_kernels" in str(w.message)]
    assert len(messages) == 1 and expected_reason in messages[0], messages
    torch.manual_seed(5)
    want = _sdpa(attention_module, q, k, v, keep if mask is None else mask, dropout=kwargs.get("dropout", 0.0),
                 scaling=0.25)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_strict_raises_instead_of_falling_back(models, fresh_warnings):
    model = stock(models, "mistral")
    patch_attention(model, strict=True)
    try:
        q, k, v = _attention_call()
        module = model.model.layers[0].self_attn
        with pytest.raises(NotImplementedError, match="attention dropout.*strict=True"):
            patched_attention.attention_forward(module, q, k, v, None, dropout=0.1)
        with pytest.raises(NotImplementedError, match="'attention_temperature'"):
            patched_attention.attention_forward(module, q, k, v, None, attention_temperature=2.0)
        model.train()
        model.config.attention_dropout = 0.1
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        with pytest.raises(NotImplementedError, match="attention dropout"):
            model(torch.randint(3, VOCAB, (1, 8)))
    finally:
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.0
        model.config.attention_dropout = 0.0
        unpatch_attention(model)
    assert not hasattr(model.model.layers[0].self_attn, "_qlora_kernels_strict")


def test_patch_keeps_attention_fallbacks_warning(models, fresh_warnings):
    """patch's strict is about architectures and layers: an attention call the kernels do not
    implement still runs (through SDPA, one warning) under the default patch(model)."""
    model = stock(models, "qwen2")
    qk.patch(model)
    ids = torch.randint(3, VOCAB, (1, 8))
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            got = model(ids, attention_temperature=2.0).logits
            torch.testing.assert_close(got, model(ids).logits, atol=2e-5, rtol=1e-4)
        assert any("'attention_temperature'" in str(w.message) for w in caught)
    finally:
        qk.unpatch(model)


def test_softcap_or_sinks_with_dropout_is_refused(attention_module, fresh_warnings):
    q, k, v = _attention_call()
    with pytest.raises(NotImplementedError, match="softcap.*eager"):
        patched_attention.attention_forward(attention_module, q, k, v, None, dropout=0.1, softcap=5.0)
    with pytest.raises(NotImplementedError, match="s_aux.*eager"):
        patched_attention.attention_forward(attention_module, q, k, v, None, dropout=0.1, s_aux=torch.zeros(4))


def test_harmless_keywords_stay_in_the_kernels(attention_module, fresh_warnings, monkeypatch):
    q, k, v = _attention_call()
    monkeypatch.setattr(patched_attention, "_sdpa_fallback", None)  # any fallback would fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched_attention.attention_forward(attention_module, q, k, v, None, scaling=0.25, use_cache=True,
                                            output_attentions=False, position_bias=None, num_items_in_batch=3,
                                            cache_position=torch.arange(SEQ))


def test_sinks_go_to_the_kernels(attention_module):
    # transformers' s_aux: one logit per head in the softmax denominator
    q, k, v = _attention_call()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out, _ = patched_attention.attention_forward(attention_module, q, k, v, None, scaling=0.25, s_aux=sinks)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * 0.25
    scores = scores.masked_fill(~keep_mask(SEQ, SEQ, True), -torch.inf)
    scores = torch.cat([scores, sinks.view(1, 4, 1, 1).expand(2, 4, SEQ, 1)], dim=-1)
    want = torch.einsum("bhqk,bhkd->bqhd", torch.softmax(scores, -1)[..., :-1], v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
