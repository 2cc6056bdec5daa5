"""LoRA linear at training sizes on the GPU: W dequantized once, the base product on cuBLAS.

y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ (reference/lora.py) where M, the number of
tokens, is large enough that the base product is compute-bound. The fused kernel
(triton/lora.py) dequantizes W again for every tile of rows and keeps the tensor cores
busy a fraction of the time cuBLAS does; one dequantize pass over W costs a few percent
of the GEMM at M in the thousands. The CUDA backend picks this path by M
(backends/cuda.py, LORA_DEQUANT_ONCE_MIN_TOKENS).

    forward   y  = bias + scaling·xa·Bᵀ              cuBLAS, rounded to the compute dtype
              y += x·Wᵀ                               cuBLAS addmm_ (beta 1)
    backward  dx = keep/(1-p)·scaling·(dY·B)·A        Triton, the mask drawn again from the seed
              dx += dY·W                              cuBLAS addmm_ (beta 1)
              dA (Triton, split over M), dB, dbias    as the fused path computes them

xa = dropout(x)·Aᵀ [M, r] comes from the fused path's own kernel, so both paths draw the
same dropout mask from the same seed; the mask is never stored. A dense W goes to cuBLAS
as it is; an NF4 W is dequantized into the device's workspace (below) in the compute
dtype, the values `reference.nf4_dequantize` gives in that dtype.

Rounding: the fused kernel sums everything in one fp32 accumulator and rounds once. Here
the rank-r term (with the bias) is rounded to the compute dtype first, then cuBLAS reads it
back into its fp32 epilogue (beta = 1), adds the base product and rounds again. The first
rounding is relative to the small rank-r term, so y and dx carry about half an ulp of
that term more than the fused result, not half an ulp of the output. The rank-r term goes
first for that reason: the other order would round the large base product twice.

Workspace: one per device, a byte buffer that grows to the largest W seen and is then
reused, so a training step does not allocate (and, with the caching allocator off, free)
a dequantized W per layer call. Its lock makes a call's dequantize and the GEMMs that read
the buffer one unit of host-side enqueueing: on one stream, stream order then keeps the
next call's dequantize behind this call's GEMMs (autograd runs a backward on the stream
of its forward, so forward and backward share it whatever thread runs them). When
another stream takes the buffer, it first waits for the previous user's stream, and the
buffer records the new stream, so the caching allocator does not hand the memory out
while that stream may still read it once the buffer is replaced by a larger one. One
buffer per device rather than per stream: the largest W in the compute dtype is a few
hundred MB for the largest models, too much to hold once per stream.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .._native import has_cuda_kernels, native
from ..nf4_weight import NF4Weight
from .common import dtype_tag

_C = native()

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_dequantize_into(weight: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """`weight` dequantized into `out` (contiguous, of its shape, fp32/fp16/bf16, on its device):
    the CUDA C++ kernel for a CUDA tensor when it was built, else the Triton one (which also
    runs on CPU tensors under TRITON_INTERPRET=1)."""
    if out.dtype not in _COMPUTE_DTYPES or not out.is_contiguous() or out.device != weight.device \
            or tuple(out.shape) != tuple(weight.shape):
        raise ValueError(f"out must be a contiguous fp32/fp16/bf16 tensor of shape {list(weight.shape)} on "
                         f"{weight.device}, got {out.dtype} {list(out.shape)} on {out.device} (contiguous: "
                         f"{out.is_contiguous()})")
    if out.is_cuda and has_cuda_kernels():
        _C.nf4_dequantize_cuda(
            *weight.native_pointers(), weight.nested_blocksize, out.numel(), weight.blocksize, out.data_ptr(),
            dtype_tag(out.dtype), torch.cuda.current_stream(out.device).cuda_stream,
        )
        return out
    # imported on first use: `import qlora_kernels` stays free of triton's start-up cost
    from ..triton.nf4_dequant import nf4_dequantize_triton

    return nf4_dequantize_triton(weight, out.dtype, out=out)


class Workspace:
    """One device's buffer for dequantized weights (see the module doc); use `dequantized`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lock = threading.Lock()
        self.buffer: torch.Tensor | None = None  # uint8, shared by every compute dtype
        self._stream = None  # the CUDA stream of the last user

    def take(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `shape` `dtype` view of the buffer, grown when too small. Hold `lock`."""
        nbytes = shape[0] * shape[1] * dtype.itemsize
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if self._stream is not None and self._stream != stream:
                stream.wait_stream(self._stream)
                if self.buffer is not None:
                    self.buffer.record_stream(stream)
            self._stream = stream
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # freed first: the old and the new buffer are never held together
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffer[:nbytes].view(dtype).view(shape)


_workspaces: dict[torch.device, Workspace] = {}
_workspaces_lock = threading.Lock()


def workspace(device: torch.device | str) -> Workspace:
    """The workspace of `device` (created empty on first use)."""
    device = torch.device(device)
    with _workspaces_lock:
        return _workspaces.setdefault(device, Workspace(device))


@contextlib.contextmanager
def dequantized(nf4_state: NF4Weight, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    """W [N, K] in `dtype`, dequantized into `device`'s workspace. Enqueue every kernel that reads
    it inside the `with` block: the next call may overwrite the buffer after it."""
    ws = workspace(device)
    with ws.lock:
        w = ws.take(tuple(nf4_state.shape), dtype)
        yield nf4_dequantize_into(nf4_state, w)


@contextlib.contextmanager
def _base_weight(weight: torch.Tensor | None, nf4_state: NF4Weight | None, x2d: torch.Tensor) -> Iterator[torch.Tensor]:
    if weight is not None:
        yield weight
    else:
        with dequantized(nf4_state, x2d.dtype, x2d.device) as w:
            yield w


def nf4_linear_dequant_mm(x2d: torch.Tensor, nf4_state: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ + bias [M, N] in x2d's dtype (the `nf4_linear` op): W dequantized into the
    workspace, the product on cuBLAS."""
    if not x2d.shape[0]:
        return x2d.new_empty((0, nf4_state.shape[0]))
    with dequantized(nf4_state, x2d.dtype, x2d.device) as w:
        return torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))


def nf4_linear_dx_dequant_mm(dy2d: torch.Tensor, nf4_state: NF4Weight) -> torch.Tensor:
    """dx = dy·W [M, K] in dy2d's dtype (the `nf4_linear_bwd` op), W from the workspace."""
    if not dy2d.shape[0]:
        return dy2d.new_empty((0, nf4_state.shape[1]))
    with dequantized(nf4_state, dy2d.dtype, dy2d.device) as w:
        return dy2d @ w


def _check(x2d, weight, nf4_state, lora_A, lora_B) -> tuple[int, int, int]:
    if x2d.dim() != 2 or x2d.dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"x2d must be 2-D fp32/fp16/bf16, got {tuple(x2d.shape)} {x2d.dtype}")
    M, K = x2d.shape
    N, r = lora_B.shape
    if lora_A.shape != (r, K) or lora_A.dtype != x2d.dtype or lora_B.dtype != x2d.dtype:
        raise ValueError(f"lora_A must be [r, {K}] and lora_B [N, r], both {x2d.dtype}; got lora_A "
                         f"{tuple(lora_A.shape)} {lora_A.dtype} and lora_B {tuple(lora_B.shape)} {lora_B.dtype}")
    if (weight is None) == (nf4_state is None):
        raise ValueError("pass exactly one of weight (dense) and nf4_state (NF4)")
    if weight is not None and (tuple(weight.shape) != (N, K) or weight.dtype != x2d.dtype):
        raise ValueError(f"weight must be [{N}, {K}] {x2d.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if nf4_state is not None and tuple(nf4_state.shape) != (N, K):
        raise ValueError(f"nf4_state is {list(nf4_state.shape)}, the LoRA factors need [{N}, {K}]")
    return M, N, K


def lora_forward_dequant_mm(x2d: torch.Tensor, weight: torch.Tensor | None, nf4_state: NF4Weight | None,
                            bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                            dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N] in x2d's dtype, xa [M, r] fp32), the arguments and results of
    `triton.lora.lora_forward_triton`."""
    from ..triton.lora import lora_xa_triton

    M, N, _ = _check(x2d, weight, nf4_state, lora_A, lora_B)
    dtype = x2d.dtype
    xa = lora_xa_triton(x2d, lora_A, dropout_p, seed)
    # xa rounded to the dtype before its product with lora_B, as the fused kernel does
    xa_low, lora_Bt = xa.to(dtype), lora_B.t()
    if bias is None:
        y = torch.empty((M, N), dtype=dtype, device=x2d.device).addmm_(xa_low, lora_Bt, beta=0, alpha=scaling)
    else:
        y = torch.addmm(bias.to(dtype), xa_low, lora_Bt, alpha=scaling)
    if M:
        with _base_weight(weight, nf4_state, x2d) as w:
            y.addmm_(x2d, w.t())
    return y, xa


def lora_backward_dequant_mm(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None,
                             nf4_state: NF4Weight | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             dropout_p: float, seed: int, xa: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, K], dA [r, K], dB [N, r], dbias [N]) in x2d's dtype: `lora_forward_dequant_mm`'s
    gradients for dy2d, with the forward's seed, dropout_p and xa."""
    from ..triton.lora import lora_dA_triton, lora_dx_lowrank_triton

    M, N, _ = _check(x2d, weight, nf4_state, lora_A, lora_B)
    if dy2d.shape != (M, N):
        raise ValueError(f"dy2d must be [{M}, {N}], got {tuple(dy2d.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    dtype = x2d.dtype
    dy2d = dy2d.to(dtype).contiguous()
    lora_scale = float(scaling) / (1.0 - dropout_p)
    # rank-r products without dropout, rounded to the dtype as in the fused path
    dyb = dy2d @ lora_B
    dx = lora_dx_lowrank_triton(dyb, lora_A, lora_scale, dropout_p, seed)
    if M:
        with _base_weight(weight, nf4_state, x2d) as w:
            dx.addmm_(dy2d, w)
    dA = lora_dA_triton(dyb, x2d, lora_scale, dropout_p, seed).to(dtype)
    # scaling before the rounding to the dtype, as in the forward's xa · lora_Bᵀ
    dB = dy2d.t() @ (xa * scaling).to(dtype)
    dbias = dy2d.sum(0, dtype=torch.float32).to(dtype)
    return dx, dA, dB, dbias
