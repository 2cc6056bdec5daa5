"""`make demo` / `qlora-kernels demo`: NF4 storage end to end on a Llama-shaped model.

Builds a random-init Llama (no download), quantizes it with quantize_model, prints the
bytes and bits per parameter against bf16, saves the checkpoint, loads it back with stock
transformers + bitsandbytes (same bytes, same logits), converts it back with from_bnb
(shared bytes, same logits) and runs the quick NF4 benchmark.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import torch
from torch import nn

from . import NF4Linear, from_bnb, quantize_model

PRESETS = {
    # in/out features are multiples of 64, see tests/test_nf4_reference.py (bitsandbytes'
    # AVX512 dequantize of rows that straddle blocks)
    "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=8192),
}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def run(size: str = "tiny", out_root: str = "runs") -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from .bench import run as bench

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=256, **PRESETS[size])
    # _from_config keeps fp32 buffers (rotary inv_freq) fp32, as from_pretrained does
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]
    n_params = sum(m.weight.numel() for m in linears)
    bf16_bytes = _nbytes(m.weight for m in linears)
    print(f"Llama '{size}' random init: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(linears)} linear layers to quantize ({n_params / 1e6:.1f}M weights)")

    t0 = time.perf_counter()
    quantize_model(model, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16,
                   quant_storage=torch.bfloat16)
    seconds = time.perf_counter() - t0
    nf4_bytes = sum(_nbytes(v for k, v in m.state_dict().items() if k != "bias")
                    for m in model.modules() if isinstance(m, NF4Linear))
    print(f"\n{'storage':<28}{'bytes':>14}{'bits/param':>12}")
    print(f"{'bf16 linear weights':<28}{bf16_bytes:>14,}{8 * bf16_bytes / n_params:>12.3f}")
    print(f"{'NF4 + double quant':<28}{nf4_bytes:>14,}{8 * nf4_bytes / n_params:>12.3f}")
    print(f"saved {1 - nf4_bytes / bf16_bytes:.1%} of the linear weights' memory; quantized in {seconds:.2f} s\n")

    run_dir = Path(out_root) / f"demo-{dt.datetime.now():%Y%m%d-%H%M%S}"
    model.save_pretrained(run_dir / "checkpoint")
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        ours = model(ids).logits
    # bitsandbytes' CPU eval path repacks weights into another layout: compare in train
    # mode, the plain dequantize + matmul path (Llama has no dropout)
    stock = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint", device_map="cpu").train()
    with torch.no_grad():
        theirs = stock(ids).logits
    same_bytes = _same_bytes(model.state_dict(), stock.state_dict())
    print(f"stock transformers + bitsandbytes load the checkpoint: same bytes {same_bytes}, "
          f"same logits {torch.equal(ours, theirs)}")
    from_bnb(stock)
    with torch.no_grad():
        back = stock(ids).logits
    print(f"from_bnb back to NF4Linear (bytes shared): same logits {torch.equal(ours, back)}\n")
    if not (same_bytes and torch.equal(ours, theirs) and torch.equal(ours, back)):
        raise SystemExit("round trip through bitsandbytes changed the model")
    bench("nf4", quick=True, out_dir=str(run_dir / "bench"))
