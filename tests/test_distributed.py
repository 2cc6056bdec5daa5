"""FSDP2 (`fully_shard`) over a patched QLoRA Llama whose NF4 weights are stored as bf16, on 2
CPU processes (gloo): sharding, forward / backward through the fused LoRA and attention ops,
an AdamW step, full and sharded (DCP) state dicts, mixed precision. The ranks run
`distributed_worker.py` once for the module (~20 s on 2 cores); each test checks what they
wrote against a single-process run of the same model. Last, DeepSpeed ZeRO-3 through the HF
Trainer on the same model (`deepspeed_worker.py`, ~15 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
import qlora_kernels as qk
from qlora_kernels.nf4_weight import packed_nbytes

from helpers import grad_error

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without torch.distributed / gloo")

NF4_SUFFIXES = ("weight", "weight.absmax", "weight.nested_absmax", "weight.quant_map", "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp2")
    reports = worker.launch(path, timeout=240)
    return path, reports


def _load(out, name):
    return torch.load(out[0] / name, weights_only=True)


@pytest.fixture(scope="module")
def reference():
    """The same model, batch and AdamW step in one process, no FSDP."""
    model = worker.build(0)
    ids = worker.batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = worker.optimizer(worker.trainable(model).values())
    loss = worker.loss_of(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in worker.trainable(model).items()}
    opt.step()
    with torch.no_grad():
        loss_after = worker.loss_of(model, ids)
    params = {n: p.detach().clone() for n, p in worker.trainable(model).items()}
    nf4 = [n for n, m in model.named_modules() if isinstance(m, qk.NF4Linear)]
    return dict(model=model, state=state, loss=loss.detach(), grads=grads, loss_after=loss_after, params=params,
                nf4=nf4)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """uint8 view: packed NF4 bytes read as bf16 include NaN patterns, which torch.equal calls unequal."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bytes(got: dict, want: dict, keys):
    for key in keys:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(as_bytes(got[key]), as_bytes(want[key])), key


def nf4_keys(reference):
    keys = [f"{name}.{suffix}" for name in reference["nf4"] for suffix in NF4_SUFFIXES]
    assert len(keys) == 14 * len(NF4_SUFFIXES) and all(k in reference["state"] for k in keys)
    return keys


def test_nf4_weights_are_sharded_as_bf16(out, reference):
    shards = [r["train"]["nf4_shards"] for r in out[1]]
    assert sorted(shards[0]) == sorted(reference["nf4"])
    for name in reference["nf4"]:
        packed = reference["model"].get_submodule(name).weight
        for rank in range(worker.WORLD):
            global_shape, local_shape, dtype = shards[rank][name]
            assert dtype == "torch.bfloat16" and global_shape == list(packed.shape)
            assert local_shape == [packed.shape[0] // worker.WORLD, 1]  # even split: half of the bytes each


def test_loss_and_lora_grads_match_one_process(out, reference):
    for report in out[1]:  # every rank ran the fused LoRA op and flash attention, not a fallback
        assert report["train"]["kernel_calls"] == {"lora_linear": 14, "flash_attention": 2}
    got = _load(out, "train.pt")
    torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == reference["grads"].keys() and len(got["grads"]) == 28  # A and B of 14 layers
    for name, want in reference["grads"].items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got["grads"][name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_adamw_step_matches_one_process(out, reference):
    got = _load(out, "train.pt")
    for name, want in reference["params"].items():
        moved = (want - reference["state"][name]).abs().max()
        assert moved > worker.LR / 2, name  # the step did change every LoRA tensor
        torch.testing.assert_close(got["params"][name], want, rtol=1e-5, atol=2e-5, msg=name)
    torch.testing.assert_close(got["loss_after_step"], reference["loss_after"], rtol=1e-6, atol=1e-6)
    assert got["loss_after_step"] < got["loss"] - 0.05


def test_full_state_dict_is_the_single_process_one(out, reference):
    full = _load(out, "train.pt")["full_sd"]
    assert full.keys() == reference["state"].keys()
    assert_same_bytes(full, reference["state"], nf4_keys(reference))  # all-gather is byte-exact
    for name, want in reference["params"].items():
        torch.testing.assert_close(full[name], want, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("how", ["dcp", "full_loaded"])
def test_checkpoint_round_trip_is_byte_exact(out, reference, how):
    """DCP sharded save -> fresh model (other seed) -> load, and full state dict -> fresh model:
    every entry has the saved bytes, and the loaded model gives the saved model's loss."""
    got = _load(out, "train.pt")
    saved, loaded = got["full_sd"], got[f"{how}_sd"]
    assert loaded.keys() == saved.keys()
    assert_same_bytes(loaded, saved, saved.keys())
    assert torch.equal(got[f"{how}_loss"], got["loss_after_step"])


def test_fresh_models_differ_from_the_checkpoint(reference):
    """What the round trips overwrite: other NF4 bytes, other quant-state JSON (lengths too)."""
    fresh = worker.build(1).state_dict()
    keys = nf4_keys(reference)
    weights = [k for k in keys if k.endswith(".weight")]
    assert not any(torch.equal(as_bytes(fresh[k]), as_bytes(reference["state"][k])) for k in weights)
    json_keys = [k for k in keys if k.endswith("bitsandbytes__nf4")]
    assert any(fresh[k].numel() != reference["state"][k].numel() for k in json_keys)


def test_plain_dcp_load_refuses_other_json_lengths(out):
    """dcp.load into a fresh model's own state dict stops at the first JSON of another length
    (qlora_kernels.distributed.dcp_load gives those entries the saved size first)."""
    for report in out[1]:
        error = report["train"]["naive_dcp_load"]["error"]
        assert "Size mismatch" in error and "quant_state.bitsandbytes__nf4" in error


def test_broadcast_from_rank0_fails_loudly_on_other_ranks(out):
    """set_model_state_dict(broadcast_from_rank0=True) sends only parameters and persistent
    buffers: the NF4 quant state (state-dict entries of NF4Linear, not buffers) never reaches
    rank 1, whose load raises. By then torch has already copied the checkpoint's packed bytes
    into rank 1's shards in place: its layers hold new bytes with their old quant state, so the
    error must not be caught and training go on."""
    rank0, rank1 = (r["train"] for r in out[1])
    assert "ok" in rank0["broadcast_from_rank0"]
    assert rank0["broadcast_shard_is_checkpoint"] and rank0["broadcast_absmax_is_checkpoint"]
    error = rank1["broadcast_from_rank0"]["error"]
    assert error.startswith("CheckpointError") and "missing 'quant_state.bitsandbytes__nf4'" in error
    assert rank1["broadcast_shard_is_checkpoint"] and not rank1["broadcast_absmax_is_checkpoint"]


@pytest.mark.parametrize("storage, dtype, key", [(torch.bfloat16, torch.bfloat16, "bf16"),
                                                 (torch.uint8, torch.float16, "uint8_storage_fp16")])
def test_mixed_precision_that_leaves_the_bytes_alone(out, reference, storage, dtype, key):
    """param_dtype equal to the quant storage (bf16), or uint8 storage (FSDP casts only floating
    point params): the packed bytes are never cast; loss and grads are within 2x of the same
    model run in that dtype in one process."""
    got = _load(out, "mixed_precision.pt")[key]["ok"]
    for name in reference["nf4"]:
        assert torch.equal(as_bytes(got["nf4_after"][name]), as_bytes(got["nf4_before"][name])), name
    model = worker.build(0, storage).to(dtype)  # NF4Linear keeps its packed bytes and quant state
    loss = worker.loss_of(model, worker.batch())
    loss.backward()
    grads = {n: p.grad.float() for n, p in worker.trainable(model).items()}
    exact = reference["grads"]
    assert abs(got["loss"] - reference["loss"]) <= 2 * abs(loss.float() - reference["loss"]) + 1e-4
    assert grad_error(got["grads"], exact) <= 2 * grad_error(grads, exact)
    assert grad_error(got["grads"], exact) > 1e-4  # it did run in low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mixed_precision_casting_packed_bytes_raises(out, dtype):
    """param_dtype other than the bf16 storage would cast the packed bytes (fp16: same byte
    count, scrambled codes): NF4Linear refuses to read them."""
    key = {torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    for report in out[1]:
        error = report["mixed_precision"][key]
        assert error.startswith("TypeError: NF4Linear: the packed 4-bit weight is stored as torch.bfloat16 but is "
                                f"now {dtype}"), error


def test_uneven_shards_are_padded_and_exact(out):
    """45 packed bf16 rows over 2 ranks: 23 + 22 (FSDP pads rank 1's shard)."""
    assert [r["uneven"]["local_rows"] for r in out[1]] == [23, 22]
    got = _load(out, "uneven.pt")
    assert torch.equal(got["got"], got["want"])
    assert got["sd"].keys() == got["want_sd"].keys() and len(got["sd"]) == 7  # weight, bias, 5 quant entries
    assert_same_bytes(got["sd"], got["want_sd"], got["want_sd"].keys())


def test_local_shard_bytes(out, reference):
    """Per rank: half of the packed NF4 bytes, half of the other params, the whole quant state."""
    model = reference["model"]
    nf4 = [model.get_submodule(n) for n in reference["nf4"]]
    packed = sum(packed_nbytes(m.in_features * m.out_features) for m in nf4)
    bf16 = sum(2 * m.in_features * m.out_features for m in nf4)
    others = sum(p.numel() * p.element_size() for p in model.parameters()) - packed
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    for rank, report in enumerate(out[1]):
        local = report["train"]["local_bytes"]
        assert local["nf4_weight"] == packed // worker.WORLD
        assert local["other_params"] == others // worker.WORLD  # every tensor here splits evenly
        assert local["buffers"] == buffers
        assert 4 * local["nf4_weight"] == bf16 // worker.WORLD  # a quarter of a bf16 shard


def test_deepspeed_zero3_trainer(tmp_path):
    """HF Trainer + DeepSpeed ZeRO-3 (accelerate's integration), 2 CPU ranks over gloo: the NF4
    weights are partitioned as bf16 like any bf16 param, and the two logged losses and the saved
    adapter are those of the same two AdamW steps in one process."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    script = Path(__file__).with_name("deepspeed_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    facts = json.loads((tmp_path / "deepspeed.json").read_text())
    assert facts["engine"] == "DeepSpeedEngine" and facts["zero_stage"] == 3
    # the patched paths ran under ZeRO-3 (2 steps x 14 LoRA layers x fwd at least; 2 x 2 layers)
    assert facts["kernel_calls"]["lora_linear"] >= 2 * 14 and facts["kernel_calls"]["flash_attention"] >= 2 * 2

    model = worker.build(0)
    assert len(facts["nf4"]) == 14
    for name, (full_shape, local_shape, dtype, placeholder) in facts["nf4"].items():
        packed = model.get_submodule(name).weight
        assert full_shape == list(packed.shape) and dtype == "torch.bfloat16"
        assert local_shape == [packed.numel() // 2] and placeholder == 0  # half the bytes here, none in the module

    import deepspeed_worker

    opt = torch.optim.AdamW(worker.trainable(model).values(), lr=worker.LR, eps=deepspeed_worker.EPS, weight_decay=0.0)
    losses = []
    for _ in range(deepspeed_worker.STEPS):
        loss = worker.loss_of(model, worker.batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert facts["losses"] == pytest.approx(losses, rel=1e-6)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    params = {n.replace(".default", ""): p for n, p in worker.trainable(model).items()}
    assert saved.keys() == params.keys()
    for name, p in params.items():
        torch.testing.assert_close(saved[name], p.detach(), rtol=1e-5, atol=2e-5, msg=name)
