"""Per-rank bytes of an FSDP2-sharded Llama, base weights NF4 (stored as bf16) vs bf16.

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/fsdp2_memory.py [--layers 2]

Builds a Llama-3-8B-shaped model (hidden 4096, MLP 14336, 32 heads, 8 KV heads; vocab 32000
and `--layers` decoder layers to fit a laptop), once in bf16 and once with its linear layers
quantized (`quantize_model(quant_storage=torch.bfloat16)`), shards each with `fully_shard`
(one group per decoder layer plus the root) and sums, on every rank, the bytes of the local
shards of the parameters (DTensor `to_local()`, FSDP's padding included) and of the buffers
(the NF4 quant state is replicated on every rank, not sharded). Rank 0 prints a table and
the figures for 32 layers (8B) from the per-layer ones.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn


def local_bytes(model: nn.Module) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    import qlora_kernels as qk

    nf4 = [m for m in model.modules() if isinstance(m, qk.NF4Linear)]
    base = {id(m.weight) for m in model.modules() if type(m) is nn.Linear and m is not model.lm_head}
    base |= {id(m.weight) for m in nf4}
    quant_state = {id(getattr(m, n)) for m in nf4 for n in ("absmax", "code", "offset", "nested_absmax", "nested_code")}
    out = {"base weights": 0, "other params": 0, "quant state (replicated)": 0, "other buffers": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out["base weights" if id(p) in base else "other params"] += local.numel() * local.element_size()
    for b in model.buffers():
        out["quant state (replicated)" if id(b) in quant_state else "other buffers"] += b.numel() * b.element_size()
    return out


def build(layers: int, nf4: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora_kernels as qk

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # random values (NF4 of uninitialized memory could be NaN)
            p.normal_(0, 0.02)
    if nf4:
        qk.quantize_model(model, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16, progress=False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    figures = {}
    for name, nf4 in (("bf16", False), ("nf4", True)):
        model = build(args.layers, nf4)
        figures[name] = local_bytes(model)
        del model
        gc.collect()
    gathered = [None] * world
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        mib = 2**20
        print(f"Llama-3-8B shapes, {args.layers} decoder layers, vocab 32000, {world} ranks; MiB per rank")
        print(f"{'':28s}" + "".join(f"{f'{k} r{r}':>12s}" for k in ("bf16", "nf4") for r in range(world)))
        for row in gathered[0]["bf16"]:
            print(f"{row:28s}" + "".join(f"{gathered[r][k][row] / mib:12.2f}" for k in ("bf16", "nf4")
                                         for r in range(world)))
        per_layer = {k: (gathered[0][k]["base weights"] + gathered[0][k]["quant state (replicated)"]) / args.layers
                     for k in ("bf16", "nf4")}
        print(f"per decoder layer, rank 0: base weights + quant state  bf16 {per_layer['bf16'] / mib:.2f} MiB, "
              f"NF4 {per_layer['nf4'] / mib:.2f} MiB ({per_layer['nf4'] / per_layer['bf16']:.3f}x)")
        print(f"32 layers (8B), rank 0: bf16 {32 * per_layer['bf16'] / 2**30:.2f} GiB, "
              f"NF4 {32 * per_layer['nf4'] / 2**30:.2f} GiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
