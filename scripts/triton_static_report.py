"""Compile every Triton kernel of qlora_kernels for NVIDIA sm_90 and sm_80, without a GPU.

    python scripts/triton_static_report.py [--arch 90 80] [--jobs N] [--full] [--json FILE]

prints, per specialization, kernel and autotune config: registers per thread, local memory
per thread (ptxas spills), shared memory, whether it fits the target, and whether the
autotuner's pruning keeps it. `tests/test_triton_compile.py` runs this and asserts on the
JSON it writes. `--full` crosses every dtype, W path, rank, dropout and attention feature
(`cases`), many times longer than CI's set.

How: a stand-in driver reports the target (`GPUTarget("cuda", 90, 32)`, shared-memory limit
of the device) to Triton. The public launchers run on small CPU tensors with every
`kernel[grid](...)` recorded instead of launched, so each kernel is compiled with exactly the
arguments its launcher passes (`JITFunction.warmup`), for every autotune config. The one
change: `NV_PTX` is set, as the launchers do for CUDA tensors. Registers and local memory
come from `cuobjdump -res-usage` on the cubin (shipped with Triton), so cached compiles
report too; shared memory from the compiled kernel's metadata. Needs Triton's NVIDIA
backend (ptxas ships with it), not a GPU, and must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface

import qlora_kernels.triton
from qlora_kernels.backends import lora_dequant_mm
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight
from qlora_kernels.triton import lora
from qlora_kernels.triton.cross_entropy import cross_entropy_rows_triton
from qlora_kernels.triton.flash_attention import flash_attention_bwd_triton, flash_attention_fwd_triton
from qlora_kernels.triton.flash_decode import flash_decode_triton
from qlora_kernels.triton.nf4_dequant import nf4_dequantize_triton
from qlora_kernels.triton.rope import rope_triton
from qlora_kernels.triton.swiglu import swiglu_bwd_triton, swiglu_fwd_triton

# Shared memory per block (opt-in maximum) of the targets; CUDA C Programming Guide,
# "Technical Specifications per Compute Capability".
MAX_SHARED_MEM = {90: 232448, 80: 166912}
# The consumer Ampere / Ada parts (sm_86, sm_89) compile like sm_80 but have 101,376 bytes;
# the report says whether a specialization still has a fitting tile there.
SMALL_AMPERE_SHARED_MEM = 101376


@dataclasses.dataclass(frozen=True)
class Case:
    """One specialization: a name and the launcher calls that reach it."""

    name: str
    dtype: str
    run: Callable[[], None]


@dataclasses.dataclass
class Launch:
    case: Case
    kernel: object  # JITFunction or Autotuner
    args: tuple
    kwargs: dict


class _DeviceUtils:
    def __init__(self, target_driver):
        self.driver = target_driver

    def get_device_properties(self, device):
        return {"max_shared_mem": self.driver.max_shared_mem}


class StandInDriver:
    """What Triton asks the active driver while compiling and pruning, for a GPU that is not here.

    Each arch is its own device id, so JITFunction's per-device caches never mix targets.
    """

    def __init__(self, archs):
        self.archs = list(archs)
        self.device = 0
        self.max_shared_mem = MAX_SHARED_MEM[self.archs[0]]
        self.utils = _DeviceUtils(self)

    def select(self, arch: int, max_shared_mem: int | None = None) -> None:
        self.device = self.archs.index(arch)
        self.max_shared_mem = MAX_SHARED_MEM[arch] if max_shared_mem is None else max_shared_mem

    @property
    def arch(self) -> int:
        return self.archs[self.device]

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


def _empty(*shape, dtype):
    return torch.empty(shape, dtype=dtype)


def _lora_case(dtype_name: str, weight: str, r: int = 64, dropout: bool = True, bias: bool = True,
               tf32: bool = False, dequant_once: bool = False) -> Case:
    """Forward + backward of the LoRA linear, fused or (dequant_once) the training-size path of
    the CUDA backend. weight: "dense" or "nf4-bs{blocksize}", double quant, K a multiple of 64,
    with "-k%64" K not a multiple of the blocksize, with "-nodq" fp32 absmax."""
    forward, backward = ((lora_dequant_mm.lora_forward_dequant_mm, lora_dequant_mm.lora_backward_dequant_mm)
                         if dequant_once else (lora.lora_forward_triton, lora.lora_backward_triton))
    gradients = () if dequant_once else (True, True, True, bias)

    dtype = getattr(torch, dtype_name)
    # K 96 = 1.5 blocks of 64; 128 and 64 are multiples of every blocksize used. N, K and M
    # keep their divisibility by 16 (Triton specializes on it), as Llama-family sizes do.
    M, N, K = 48, 64, 96 if weight.endswith("k%64") else 128
    blocksize = int(re.search(r"bs(\d+)", weight).group(1)) if weight != "dense" else 0
    name = (f"{dtype_name}{'-tf32' if tf32 else ''} {weight} r{r}{' dropout' if dropout else ''}{' bias' if bias else ''}"
            f"{' dequantize-once' if dequant_once else ''}")

    def run():
        x, lora_A, lora_B = _empty(M, K, dtype=dtype), _empty(r, K, dtype=dtype), _empty(N, r, dtype=dtype)
        if weight == "dense":
            w, state = _empty(N, K, dtype=dtype), None
        else:
            blocks = -(-N * K // blocksize)
            double_quant = not weight.endswith("nodq")
            nested = dict(offset=_empty(dtype=torch.float32), nested_absmax=_empty(-(-blocks // 256),
                                                                                   dtype=torch.float32),
                          nested_code=_empty(256, dtype=torch.float32)) if double_quant else {}
            state = NF4Weight(_empty((N * K + 1) // 2, dtype=torch.uint8), NF4QuantState(
                _empty(blocks, dtype=torch.uint8 if double_quant else torch.float32), (N, K), dtype, blocksize,
                **nested))
            w = None
        p = 0.1 if dropout else 0.0
        before = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            y, xa = forward(x, w, state, _empty(N, dtype=dtype) if bias else None, lora_A, lora_B, 2.0, p, 1)
            backward(y, x, w, state, lora_A, lora_B, 2.0, p, 1, xa, *gradients)
        finally:
            torch.backends.cuda.matmul.fp32_precision = before

    return Case(name, dtype_name, run)


def _dropout_mask_case() -> Case:
    return Case("dropout mask", "bool", lambda: lora.lora_dropout_keep(1, 0.1, 40, 72, "cpu"))


def _dequant_case(dtype_name: str, blocksize: int, double_quant: bool) -> Case:
    n = 4096
    blocks = n // blocksize

    def run():
        if double_quant:
            nested = dict(nested_absmax=_empty(1, dtype=torch.float32), nested_code=_empty(256, dtype=torch.float32),
                          offset=_empty(dtype=torch.float32))
            absmax = _empty(blocks, dtype=torch.uint8)
        else:
            nested, absmax = {}, _empty(blocks, dtype=torch.float32)
        dtype = getattr(torch, dtype_name)
        state = NF4QuantState(absmax, (64, 64), dtype, blocksize, **nested)
        nf4_dequantize_triton(NF4Weight(_empty(n // 2, dtype=torch.uint8), state), dtype)

    return Case(f"{dtype_name} nf4-bs{blocksize}{'' if double_quant else '-nodq'}", dtype_name, run)


def _cross_entropy_case(vocab: int, compute_grad: bool, softcap: bool) -> Case:
    """The fused loss's row kernel (fp32 logits whatever the model's dtype): a vocabulary past
    the largest block, or a small one, with or without the gradient pass and the softcap."""

    def run():
        cross_entropy_rows_triton(_empty(4, vocab, dtype=torch.float32), torch.zeros(4, dtype=torch.int64), -100, 0.1,
                                  2.0 if softcap else 0.0, 1.0, compute_grad)

    name = f"cross-entropy V={vocab}{' grad' if compute_grad else ''}{' softcap' if softcap else ''}"
    return Case(name, "float32", run)


def _attention_case(dtype_name: str, head_dim: int, alibi: bool = True, padding: bool = True, group: int = 4,
                    varlen: bool = False, causal: bool = True, features: bool = True) -> Case:
    """Forward + backward. Dense inputs are [B, H, S, D] views of [B, S, H, D] (what HF passes);
    varlen is packed [T, H, D] with cu_seqlens. With `features`: a sliding window (37 keys back,
    and 11 ahead without the causal mask), logit softcap, sinks, a gradient into lse, and for
    varlen keys packed apart from queries (cu_seqlens_k)."""
    dtype = getattr(torch, dtype_name)
    heads_kv = 2
    heads_q = heads_kv * group
    B, S = 2, 100
    flags = [f"D{head_dim}", "causal" if causal else "full", f"group{group}"]
    flags += ["alibi"] * alibi + ["padding"] * padding + ["varlen"] * varlen
    flags += ["window softcap sinks dlse"] * features + ["cu_seqlens_k"] * (features and varlen)

    def run():
        slopes = _empty(heads_q, dtype=torch.float32) if alibi else None
        extra = {}
        if features:
            extra = dict(window_left=37, window_right=-1 if causal else 11, softcap=30.0,
                         sinks=_empty(heads_q, dtype=torch.float32))
        if varlen:
            keys = B * S + 20 if features else B * S
            q = _empty(B * S, heads_q, head_dim, dtype=dtype)
            k, v = (_empty(keys, heads_kv, head_dim, dtype=dtype) for _ in range(2))
            extra.update(cu_seqlens=torch.tensor([0, 37, B * S], dtype=torch.int32), max_seqlen=B * S - 37)
            if features:
                extra.update(cu_seqlens_k=torch.tensor([0, 57, keys], dtype=torch.int32), max_seqlen_k=keys - 57)
            lse_shape = (heads_q, B * S)
        else:
            q, k, v = (_empty(B, S, h, head_dim, dtype=dtype).transpose(1, 2) for h in (heads_q, heads_kv, heads_kv))
            extra.update(key_padding_mask=torch.ones(B, S, dtype=torch.bool) if padding else None)
            lse_shape = (B, heads_q, S)
        out, _ = flash_attention_fwd_triton(q, k, v, causal, None, slopes, **extra)
        dlse = _empty(*lse_shape, dtype=torch.float32) if features else None
        flash_attention_bwd_triton(torch.empty_like(out), q, k, v, out, _empty(*lse_shape, dtype=torch.float32),
                                   causal, None, slopes, dlse=dlse, **extra)

    return Case(f"{dtype_name} {' '.join(flags)}", dtype_name, run)


def _decode_case(dtype_name: str, head_dim: int, alibi: bool = True, padding: bool = True,
                 window_softcap_sinks: bool = True, varlen: bool = False) -> Case:
    """One new token per sequence against a 1000-key cache, GQA group 4, the keys cut in 6 splits;
    with `window_softcap_sinks` a 600-key sliding window, logit softcap and attention sinks;
    `varlen` packs queries and caches ([T, H, D], cu_seqlens and cu_seqlens_k; no padding)."""
    dtype = getattr(torch, dtype_name)
    B, heads_kv, Sk = 2, 2, 1000

    def run():
        features = (dict(window_left=600, softcap=50.0, sinks=_empty(heads_kv * 4, dtype=torch.float32))
                    if window_softcap_sinks else {})
        if varlen:
            q = _empty(B, heads_kv * 4, head_dim, dtype=dtype)
            k, v = (_empty(B * Sk, heads_kv, head_dim, dtype=dtype) for _ in range(2))
            features.update(cu_seqlens=torch.tensor([0, 1, B], dtype=torch.int32), max_seqlen=1,
                            cu_seqlens_k=torch.tensor([0, Sk, B * Sk], dtype=torch.int32), max_seqlen_k=Sk)
        else:
            q = _empty(B, 1, heads_kv * 4, head_dim, dtype=dtype).transpose(1, 2)
            k, v = (_empty(B, heads_kv, Sk, head_dim, dtype=dtype) for _ in range(2))
        flash_decode_triton(q, k, v, None, _empty(heads_kv * 4, dtype=torch.float32) if alibi else None,
                            torch.ones(B, Sk, dtype=torch.bool) if padding else None, num_splits=6, **features)

    flags = [f"D{head_dim}"] + ["alibi"] * alibi + ["padding"] * padding
    flags += ["window softcap sinks"] * window_softcap_sinks + ["varlen"] * varlen
    return Case(f"{dtype_name} decode {' '.join(flags)}", dtype_name, run)


def _norm_case(dtype_name: str, hidden: int, cast_before_weight: bool, weight_dtype_name: str | None = None) -> Case:
    """RMSNorm forward + backward (dweight too) over 40 rows of `hidden`; Llama's rounding
    (cast_before_weight) or Gemma's, the weight in x's dtype or in `weight_dtype_name`."""
    from qlora_kernels.triton.rms_norm import rms_norm_bwd_triton, rms_norm_fwd_triton

    dtype = getattr(torch, dtype_name)
    weight_dtype = getattr(torch, weight_dtype_name or dtype_name)
    y_dtype = torch.promote_types(dtype, weight_dtype) if cast_before_weight else dtype
    rounding = "llama" if cast_before_weight else "gemma"

    def run():
        x, w = _empty(40, hidden, dtype=dtype), _empty(hidden, dtype=weight_dtype)
        y, rstd = rms_norm_fwd_triton(x, w, 1e-6, 0.0, cast_before_weight, y_dtype)
        rms_norm_bwd_triton(y, x, w, rstd, 0.0, cast_before_weight, True)

    return Case(f"rms_norm {dtype_name}{'-' + weight_dtype_name if weight_dtype_name else ''} H{hidden} {rounding}",
                dtype_name, run)


def _swiglu_case(dtype_name: str, activation: str, packed: bool = False) -> Case:
    """SwiGLU forward + backward on 48 rows of 4096 (a Llama-7B-like row is 11008; the kernels
    tile columns only); `packed`: gate and up the halves of one gate_up, as Phi-3 has them."""
    dtype = getattr(torch, dtype_name)
    rows, cols = 48, 4096

    def run():
        if packed:
            gate_up = _empty(rows, 2 * cols, dtype=dtype)
            gate, up = gate_up[:, :cols], gate_up[:, cols:]
            dgate_up = torch.empty_like(gate_up)
            dgate, dup = dgate_up[:, :cols], dgate_up[:, cols:]
        else:
            gate, up, dgate, dup = (_empty(rows, cols, dtype=dtype) for _ in range(4))
        out = _empty(rows, cols, dtype=dtype)
        swiglu_fwd_triton(gate, up, out, activation)
        swiglu_bwd_triton(out, gate, up, dgate, dup, activation)

    return Case(f"{dtype_name} swiglu {activation}{' packed' if packed else ''}", dtype_name, run)


def _rope_case(dtype_name: str, head_dim: int, rotary_dim: int, cos_dtype: str | None = None) -> Case:
    """Forward and backward rotation of q (8 heads) and k (2 heads) as HF passes them ([B, H, S, D]
    views of [B, S, H, D]) with cos / sin [1, S, rotary_dim]; rotary_dim < head_dim copies the rest."""
    dtype = getattr(torch, dtype_name)
    tables = getattr(torch, cos_dtype) if cos_dtype else dtype

    def run():
        B, S = 2, 100
        q = _empty(B, S, 8, head_dim, dtype=dtype).transpose(1, 2)
        k = _empty(B, S, 2, head_dim, dtype=dtype).transpose(1, 2)
        cos, sin = _empty(1, S, rotary_dim, dtype=tables), _empty(1, S, rotary_dim, dtype=tables)
        for backward in (False, True):
            rope_triton(q, k, cos, sin, torch.empty_like(q), torch.empty_like(k), backward)

    flags = f"D{head_dim} rotary{rotary_dim}" + (f" {cos_dtype} tables" if cos_dtype else "")
    return Case(f"{dtype_name} rope {flags}", dtype_name, run)


def _rope_cases(full: bool) -> list[Case]:
    if full:
        return [_rope_case(dtype, d, r) for dtype in ("bfloat16", "float16", "float32")
                for d, r in ((64, 64), (96, 32), (96, 96), (128, 128), (256, 256), (128, 64))]
    return [_rope_case("bfloat16", 128, 128), _rope_case("float32", 64, 64), _rope_case("bfloat16", 96, 32),
            _rope_case("float16", 256, 256), _rope_case("bfloat16", 128, 128, "float32")]


def cases(full: bool) -> list[Case]:
    """The specializations compiled. CI's set reaches every kernel and every entry of every tile
    table: each W path of the LoRA kernels (dense; NF4 with one absmax per tile row or per
    element; blocksize 32, 64, 128; double quant or not), each compute dtype and TF32, ranks
    giving each BLOCK_R, each head dim and attention feature, mostly at their most demanding
    (dropout, bias, rank 64; ALiBi, padding, GQA, window, softcap, sinks, dlse). fp16 and bf16
    compile alike, so fp16 stands for both in some cases and bf16 in the rest. `full` crosses
    all of them."""
    out = [_dropout_mask_case()]
    if full:
        weights = ("dense", "nf4-bs64", "nf4-bs32", "nf4-bs128", "nf4-bs64-k%64", "nf4-bs64-nodq")
        for dtype, tf32 in (("bfloat16", False), ("float16", False), ("float32", False), ("float32", True)):
            for weight in weights:
                for r in (8, 32, 64):
                    for dropout in (False, True):
                        out += [_lora_case(dtype, weight, r, dropout, dropout, tf32)]
            out += [_lora_case(dtype, "nf4-bs64", tf32=tf32, dequant_once=True)]
        for dtype in ("bfloat16", "float16", "float32"):
            for bs in (32, 64, 128):
                out += [_dequant_case(dtype, bs, True), _dequant_case(dtype, bs, False)]
            for d in (64, 128, 256):
                for alibi in (False, True):
                    for group in (1, 4):
                        for features in (False, True):
                            out += [_attention_case(dtype, d, alibi, alibi, group, features=features),
                                    _attention_case(dtype, d, alibi, False, group, varlen=True, features=features)]
                out += [_attention_case(dtype, d, causal=False, features=False),
                        _attention_case(dtype, d, causal=False), _decode_case(dtype, d, False, False, False),
                        _decode_case(dtype, d), _decode_case(dtype, d, padding=False, varlen=True)]
            for hidden in (64, 1000, 4096, 8192):
                out += [_norm_case(dtype, hidden, True), _norm_case(dtype, hidden, False)]
            out += [_swiglu_case(dtype, activation, packed) for activation in ("silu", "gelu_tanh")
                    for packed in (False, True)]
        out += [_cross_entropy_case(v, g, c) for v in (32000, 100) for g in (False, True) for c in (False, True)]
        return out + _rope_cases(full)
    out += [_lora_case("bfloat16", w) for w in ("nf4-bs64", "nf4-bs64-k%64", "nf4-bs32")]
    out += [_lora_case("bfloat16", "nf4-bs128-nodq", r=8, dropout=False, bias=False),
            _lora_case("float16", "dense", r=32)]
    out += [_lora_case("float32", w) for w in ("dense", "nf4-bs64-k%64")]
    out += [_lora_case("float32", w, tf32=True) for w in ("nf4-bs64", "nf4-bs64-k%64")]
    out += [_lora_case(dtype, "nf4-bs64", tf32=tf32, dequant_once=True)
            for dtype, tf32 in (("bfloat16", False), ("float32", False), ("float32", True))]
    out += [_dequant_case("bfloat16", 64, True), _dequant_case("float16", 32, False), _dequant_case("float32", 128, True)]
    out += [_attention_case(dtype, d) for dtype in ("bfloat16", "float32") for d in (64, 128, 256)]
    out += [_attention_case("bfloat16", 128, False, False, 1, varlen=True),
            _attention_case("bfloat16", 64, False, False, 1, causal=False),
            _attention_case("bfloat16", 128, features=False)]
    out += [_decode_case("bfloat16", d) for d in (64, 128, 256)] + [_decode_case("float32", 256)]
    out += [_decode_case("bfloat16", 128, padding=False, varlen=True)]
    out += [_norm_case("bfloat16", h, True) for h in (64, 4096, 8192)] + [_norm_case("bfloat16", 3072, False),
                                                                          _norm_case("bfloat16", 4096, True, "float32"),
                                                                          _norm_case("float32", 8192, False)]
    out += [_cross_entropy_case(32000, True, True), _cross_entropy_case(32000, False, False),
            _cross_entropy_case(100, True, False)]
    out += [_swiglu_case("bfloat16", "silu"), _swiglu_case("bfloat16", "gelu_tanh", packed=True),
            _swiglu_case("float32", "silu", packed=True), _swiglu_case("float16", "gelu_tanh")]
    return out + _rope_cases(full)


def record(case: Case) -> list[Launch]:
    """The kernel launches `case` makes, recorded instead of run."""
    launches = []

    def getitem(kernel, grid):
        return lambda *args, **kwargs: launches.append(Launch(case, kernel, args, kwargs))

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        case.run()
    finally:
        KernelInterface.__getitem__ = original
    for launch in launches:
        if "NV_PTX" in launch.kwargs:
            launch.kwargs["NV_PTX"] = True
    return launches


def _jit_function(kernel):
    while not isinstance(kernel, JITFunction):  # an Autotuner wraps it
        kernel = kernel.fn
    return kernel


def _signature_key(launch: Launch) -> tuple:
    """Two launches with equal keys compile to the same kernels: constexprs by value, other
    integers by Triton's specialization (1, multiple of 16, other), tensors by dtype."""
    fn = _jit_function(launch.kernel)
    bound = dict(zip(fn.arg_names, launch.args), **launch.kwargs)
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    key = [fn.__name__]
    for name, value in sorted(bound.items()):
        if hasattr(value, "data_ptr"):
            value = ("tensor", str(value.dtype))
        elif isinstance(value, int) and not isinstance(value, bool) and name not in constexpr:
            value = ("int", value == 1, value % 16 == 0)
        elif isinstance(value, float) and name not in constexpr:
            value = "float"
        key.append((name, repr(value)))
    return tuple(key)


def _config_name(config) -> str:
    if config is None:
        return "launcher's"
    tiles = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles}, stages={config.num_stages}, warps={config.num_warps}"


def _resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    return dict(regs=int(found.group(1)), local=int(found.group(2)) + int(found.group(3)),
                shared=compiled.metadata.shared)


def _compile(launch: Launch, config) -> dict:
    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    return _resources(_jit_function(launch.kernel).warmup(*launch.args, grid=(1,), **kwargs))


def _prune(launch: Launch, max_shared_mem: int) -> list:
    """The autotuner's own pruning of this launch's configs on a device with that much shared memory."""
    autotuner = launch.kernel
    _STATE.driver.select(_STATE.driver.arch, max_shared_mem)
    autotuner.nargs = dict(zip(autotuner.arg_names, launch.args))
    try:
        return autotuner.prune_configs(dict(launch.kwargs, grid=(1,), warmup=False))
    finally:
        autotuner.nargs = None
        _STATE.driver.select(_STATE.driver.arch)


class _State:
    driver: StandInDriver
    units: list  # (arch, [Launch, ...] sharing one signature key)


_STATE = _State()


def _setup(archs, full, only) -> None:
    """Per process: the stand-in driver, then every case recorded into compile units."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    _STATE.driver = StandInDriver(archs)
    driver.set_active(_STATE.driver)
    by_key = {}
    for case in cases(full):
        if only not in case.name:
            continue
        for launch in record(case):
            by_key.setdefault(_signature_key(launch), []).append(launch)
    # autotuned kernels first: the longest units start first when they are spread over processes
    groups = sorted(by_key.values(), key=lambda group: not hasattr(group[0].kernel, "configs"))
    _STATE.units = [(arch, group) for group in groups for arch in archs]


def _run_unit(index: int) -> list[dict]:
    arch, group = _STATE.units[index]
    _STATE.driver.select(arch)
    launch = group[0]
    start = time.perf_counter()
    if isinstance(launch.kernel, Autotuner):
        # every config a specialization can be given: the pruning with unlimited shared memory
        candidates = _prune(launch, 1 << 40)
        kept = _prune(launch, MAX_SHARED_MEM[arch])
        small_kept = _prune_or_none(launch, SMALL_AMPERE_SHARED_MEM) if arch == 80 else None
        configs = [(c, c in kept, None if small_kept is None else c in small_kept) for c in candidates]
        try:
            _prune(launch, 0)
            no_fit_error = None
        except RuntimeError as error:
            no_fit_error = str(error)
    else:
        configs = [(None, None, None)]
        no_fit_error = None
    rows = []
    for config, kept_here, kept_small in configs:
        figures = _compile(launch, config)
        for member in group:
            rows.append(dict(arch=arch, case=member.case.name, dtype=member.case.dtype,
                             kernel=_jit_function(launch.kernel).__name__, config=_config_name(config),
                             fits=figures["shared"] <= MAX_SHARED_MEM[arch], kept=kept_here, kept_sm86=kept_small,
                             no_fit_error=no_fit_error, **figures))
    rows[0]["seconds"] = round(time.perf_counter() - start, 1)
    return rows


def _prune_or_none(launch: Launch, max_shared_mem: int) -> list:
    try:
        return _prune(launch, max_shared_mem)
    except RuntimeError:
        return []


def kernels_defined() -> set[str]:
    """Every kernel of qlora_kernels.triton (by convention named *_kernel)."""
    names = set()
    package = qlora_kernels.triton
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, (JITFunction, Autotuner)) and name.endswith("_kernel"):
                names.add(_jit_function(value).__name__)
    return names


def report(archs=(90, 80), jobs=None, full=False, only="") -> dict:
    _setup(archs, full, only)
    jobs = jobs or os.cpu_count() or 1
    start = time.perf_counter()
    indices = range(len(_STATE.units))
    if jobs == 1:
        results = map(_run_unit, indices)
    else:
        # spawn: each process sets up its own stand-in driver and records the same units
        pool = concurrent.futures.ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"),
                                                      initializer=_setup, initargs=(archs, full, only))
        with pool:
            results = list(pool.map(_run_unit, indices))
    rows = [row for unit in results for row in unit]
    compiled = {row["kernel"] for row in rows}
    return dict(rows=rows, kernels_not_compiled=sorted(kernels_defined() - compiled),
                max_shared_mem={str(a): MAX_SHARED_MEM[a] for a in archs},
                wall_seconds=round(time.perf_counter() - start, 1))


def format_table(result: dict) -> str:
    lines = []
    header = f"{'arch':>4} {'kernel':<24} {'config':<62} {'regs':>4} {'local':>5} {'shared':>7}  fits kept"
    last = None
    for row in sorted(result["rows"], key=lambda r: (r["case"], -r["arch"], r["kernel"])):
        if row["case"] != last:
            lines += ["", f"== {row['case']}", header]
            last = row["case"]
        kept = "" if row["kept"] is None else ("yes" if row["kept"] else "no")
        lines.append(f"{row['arch']:>4} {row['kernel']:<24} {row['config']:<62} {row['regs']:>4} {row['local']:>5} "
                     f"{row['shared']:>7}  {'yes' if row['fits'] else 'NO':<4} {kept}")
    if result["kernels_not_compiled"]:
        lines += ["", "kernels no case compiles: " + ", ".join(result["kernels_not_compiled"])]
    lines += ["", f"{len(result['rows'])} rows in {result['wall_seconds']} s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(MAX_SHARED_MEM))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--full", action="store_true", help="every combination of the specializations")
    parser.add_argument("--case", default="", help="only the specializations whose name contains this")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    result = report(tuple(args.arch), args.jobs, args.full, args.case)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
