"""FSDP2 over a patched QLoRA Llama (NF4 weights stored as bf16): one rank of a CPU / gloo run.

`tests/test_distributed.py` starts two of these (`launch`) and compares what rank 0 writes to
OUT with a single-process run of the same model. Also runnable by hand:

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT

Each rank builds the same model (same seeds), shards it with `fully_shard` (one group per
decoder layer plus the root; packed bf16 NF4 weights and fp32 LoRA params in the same groups)
and runs, on its half of a fixed batch:

- `train`: loss and LoRA gradients of one forward / backward, one AdamW step, the loss after
  it, a full state dict (gathered on rank 0), a sharded DCP save, DCP load into a fresh model
  built with other seeds, full-state-dict load into another fresh model: their state dicts and
  losses. Also: the local shard bytes of each rank (parameters and buffers), what a plain
  `dcp.load` and `set_model_state_dict(broadcast_from_rank0=True)` do with NF4 layers.
- `mixed_precision`: MixedPrecisionPolicy variants; what each gives (loss, gradients) or raises.
- `uneven`: one NF4Linear whose packed bf16 weight has an odd number of rows (padded shard).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qlora_kernels.distributed import dcp_load

WORLD = 2
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
LR = 1e-2


# -- the model, shared with the single-process side of the test ------------------------------

def build(seed: int = 0, quant_storage: torch.dtype = torch.bfloat16) -> nn.Module:
    """Random Llama (GQA) -> PEFT LoRA on all linear layers -> NF4 base weights in
    `quant_storage` -> fused LoRA and flash attention. Deterministic in `seed`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora_kernels as qk

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    # the LoRA layers' base nn.Linear -> NF4Linear (qk.patch(quantize="nf4") would store uint8)
    qk.quantize_model(model, compute_dtype=torch.float32, quant_storage=quant_storage, progress=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: make the LoRA branch count
            nn.init.normal_(p, std=0.1)
    qk.patch(model)  # fused LoRA + flash attention
    assert len(qk.patch_report(model).lora_layers) == 7 * CONFIG["num_hidden_layers"]
    assert model.config._attn_implementation == "qlora_kernels"
    return model.train()


def count_kernel_calls() -> dict:
    """Count the patched layers' calls of the fused LoRA op and of flash attention from now on
    (a fallback to PEFT's forward or to SDPA would leave them at 0)."""
    from qlora_kernels.patching import attention, lora

    calls = {"lora_linear": 0, "flash_attention": 0}

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        setattr(module, name, wrapper)

    counted(lora, "lora_linear")
    counted(attention, "flash_attention")
    return calls


def batch() -> torch.Tensor:
    """4 sequences of 16 tokens: rank r trains on rows 2r, 2r + 1."""
    return torch.randint(0, CONFIG["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(123))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer(params) -> torch.optim.Optimizer:
    # eps well above the LoRA gradients' rounding (~1e-8): Adam's first step is lr * g / (|g| + eps),
    # which for |g| ~ eps would turn a last-bit difference into an lr-sized one
    return torch.optim.AdamW(params, lr=LR, eps=1e-6, weight_decay=0.01)


# -- FSDP2 -----------------------------------------------------------------------------------

def shard(model: nn.Module, mp_policy=None, nf4_policy=None) -> nn.Module:
    """fully_shard each decoder layer and the root; with `nf4_policy`, each NF4Linear first
    becomes its own group under that policy (so `mp_policy` never reaches the packed bytes)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import qlora_kernels as qk

    mp_policy = mp_policy or MixedPrecisionPolicy()
    if nf4_policy is not None:
        for m in model.modules():
            if isinstance(m, qk.NF4Linear):
                fully_shard(m, mp_policy=nf4_policy)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    return model


def local_ids(rank: int) -> torch.Tensor:
    return batch()[2 * rank: 2 * rank + 2]


def global_loss(model: nn.Module, rank: int) -> torch.Tensor:
    """Mean loss over the whole batch (each rank: its half, same token count)."""
    loss = loss_of(model, local_ids(rank))
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss, total / WORLD


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds: local shards of the parameters (NF4 packed weights and the rest)
    and the buffers (the NF4 quant state is replicated on every rank)."""
    from torch.distributed.tensor import DTensor

    import qlora_kernels as qk

    nf4_weights = {id(m.weight) for m in model.modules() if isinstance(m, qk.NF4Linear)}
    out = {"nf4_weight": 0, "other_params": 0, "buffers": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out["nf4_weight" if id(p) in nf4_weights else "other_params"] += local.numel() * local.element_size()
    for b in model.buffers():
        out["buffers"] += b.numel() * b.element_size()
    return out


# -- scenarios -------------------------------------------------------------------------------

def _attempt(fn) -> dict:
    try:
        return {"ok": fn()}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001  (what it raised is the result; DCP's CheckpointException
        print(f"_attempt: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}  # is a BaseException)


def scenario_train(rank: int, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor, Shard

    import qlora_kernels as qk

    model = shard(build(0))
    facts = {"local_bytes": local_bytes(model), "nf4_shards": {}}
    for name, m in model.named_modules():
        if isinstance(m, qk.NF4Linear):
            w = m.weight
            assert isinstance(w, DTensor) and w.placements == (Shard(0),), (name, type(w))
            facts["nf4_shards"][name] = [list(w.shape), list(w.to_local().shape), str(w.dtype)]

    # one forward / backward, one optimizer step, the loss after it
    opt = optimizer(trainable(model).values())
    calls = count_kernel_calls()
    loss, mean = global_loss(model, rank)
    loss.backward()
    facts["kernel_calls"] = dict(calls)
    grads = {n: full(p.grad) for n, p in trainable(model).items()}
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        _, mean_after = global_loss(model, rank)
    params = {n: full(p.detach()) for n, p in trainable(model).items()}

    # checkpoints: full (gathered on rank 0) and sharded (DCP)
    saved_full = full_state_dict(model)
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "dcp"))

    fresh = shard(build(1))  # other random weights, quant states (JSON lengths too) and LoRA
    # DCP's own load into the fresh model's state dict, without resizing the JSON entries
    naive = _attempt(lambda: dcp.load(get_model_state_dict(fresh), checkpoint_id=str(out / "dcp")) or "loaded")
    dcp_load(fresh, out / "dcp")
    with torch.no_grad():
        _, dcp_loss = global_loss(fresh, rank)
    dcp_full = full_state_dict(fresh)

    # full state dict, every rank holding it (here rank 0's, sent as an object)
    # (set_model_state_dict puts the local shards into the dict it is given: hand it a copy)
    holder = [dict(saved_full) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    fresh2 = shard(build(2))
    set_model_state_dict(fresh2, holder[0], options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        _, full_loss = global_loss(fresh2, rank)
    full_loaded = full_state_dict(fresh2)

    # full state dict on rank 0 only, broadcast by set_model_state_dict
    fresh3 = shard(build(3))
    facts["broadcast_from_rank0"] = _attempt(lambda: str(set_model_state_dict(
        fresh3, dict(saved_full) if rank == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))))
    ckpt = [dict(saved_full) if rank == 0 else None]
    dist.broadcast_object_list(ckpt, src=0)
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
    layer, key = fresh3.get_submodule(name), name + ".weight"
    rows = layer.weight.to_local().shape[0]
    facts["broadcast_shard_is_checkpoint"] = torch.equal(
        layer.weight.to_local().view(torch.uint8), ckpt[0][key][rank * rows:(rank + 1) * rows].view(torch.uint8))
    facts["broadcast_absmax_is_checkpoint"] = torch.equal(layer.absmax, ckpt[0][key + ".absmax"])
    facts["naive_dcp_load"] = naive

    if rank == 0:
        torch.save({"loss": mean, "grads": grads, "params": params, "loss_after_step": mean_after,
                    "full_sd": saved_full, "dcp_sd": dcp_full, "dcp_loss": dcp_loss, "full_loaded_sd": full_loaded,
                    "full_loaded_loss": full_loss},
                   out / "train.pt")
    return facts


def scenario_mixed_precision(rank: int, out: Path) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import qlora_kernels as qk

    def run(storage, policy):
        model = shard(build(0, storage), policy)
        nf4 = {n: m for n, m in model.named_modules() if isinstance(m, qk.NF4Linear)}
        before = {n: full(m.weight.detach()).clone() for n, m in nf4.items()}
        loss, mean = global_loss(model, rank)
        loss.backward()
        grads = {n: full(p.grad).float() for n, p in trainable(model).items()}
        after = {n: full(m.weight.detach()) for n, m in nf4.items()}
        return {"loss": mean, "grads": grads, "nf4_before": before, "nf4_after": after}

    results = {
        "bf16": _attempt(lambda: run(torch.bfloat16, MixedPrecisionPolicy(torch.bfloat16, torch.float32))),
        "fp16": _attempt(lambda: run(torch.bfloat16, MixedPrecisionPolicy(torch.float16, torch.float32))),
        "fp32": _attempt(lambda: run(torch.bfloat16, MixedPrecisionPolicy(torch.float32))),
        "uint8_storage_fp16": _attempt(lambda: run(torch.uint8, MixedPrecisionPolicy(torch.float16, torch.float32))),
    }
    if rank == 0:
        torch.save(results, out / "mixed_precision.pt")
    return {k: v.get("error", "ok") for k, v in results.items()}


def scenario_uneven(rank: int, out: Path) -> dict:
    from torch.distributed.fsdp import fully_shard

    import qlora_kernels as qk

    torch.manual_seed(7)
    linear = nn.Linear(12, 15)  # 180 values -> 90 bytes -> 45 bf16 rows: 23 + 22 over 2 ranks
    layer = qk.NF4Linear.from_linear(linear, compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    model = nn.Sequential(layer)
    want_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(8))
    want = model(x)
    fully_shard(model)
    got = model(x)
    sd = full_state_dict(model)
    if rank == 0:
        torch.save({"want": want.detach(), "got": got.detach(), "want_sd": want_sd, "sd": sd}, out / "uneven.pt")
    return {"local_rows": layer.weight.to_local().shape[0]}


SCENARIOS = {"train": scenario_train, "mixed_precision": scenario_mixed_precision, "uneven": scenario_uneven}


def main(out: str, rank: int, world: int, init: str | None, scenarios: list[str]) -> None:
    out = Path(out)
    faulthandler.register(signal.SIGUSR1)  # the launcher asks for the stacks of a hung rank
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    report = {}
    try:
        for name in scenarios:
            start = time.perf_counter()
            report[name] = SCENARIOS[name](rank, out)
            report[name + "_seconds"] = round(time.perf_counter() - start, 2)
            dist.barrier()
    except Exception:
        report["traceback"] = traceback.format_exc()
        raise
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        dist.destroy_process_group()


# -- launching -------------------------------------------------------------------------------

def launch(out: Path, scenarios=tuple(SCENARIOS), world: int = WORLD, timeout: float = 300) -> list[dict]:
    """Run `world` ranks of this script as subprocesses (file:// rendezvous: no port to pick).
    Returns each rank's report; raises with their output when one fails or hangs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init = f"file://{out / 'rendezvous'}"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    procs = []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, __file__, str(out), "--rank", str(rank), "--world", str(world), "--init", init,
               "--scenarios", ",".join(scenarios)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + timeout
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(2)
            for p, _ in procs:
                p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append((rank, rc))
    if failed:
        logs = "\n".join(f"--- rank {r} ({rc}) ---\n" + (out / f"rank{r}.log").read_text()[-6000:] for r, rc in failed)
        raise RuntimeError(f"distributed worker failed: {failed}\n{logs}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    ap.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", WORLD)))
    ap.add_argument("--init", default=None, help="init_method (default: env://, as torchrun sets it)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    if args.world != WORLD:
        sys.exit(f"this worker splits its batch over {WORLD} ranks")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    main(args.out, args.rank, args.world, args.init or "env://", args.scenarios.split(","))
