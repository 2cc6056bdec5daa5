"""The NF4 weight type: packed bytes and the quant state that reads them, validated once.

`NF4QuantState` (bitsandbytes' QuantState, NF4 only) and `NF4Weight` (packed bytes + state)
check every size, dtype and device when they are built, so the C++, CUDA and Triton kernels,
which read raw pointers, can trust them. The ops (`ops/nf4.py`, `ops/lora.py`) take a weight
as flat arguments (`NF4Weight.op_args`); their fake, default and per-device implementations
rebuild it with `NF4Weight.from_op_args`, which runs the same checks (`torch._check` for sizes
known only at run time), so calling an op directly is as safe as the public API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import reference
from ._checks import is_fake, require

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NF4_CODE_SIZE = 16
NESTED_CODE_SIZE = 256
_STATE_TENSORS = ("absmax", "code", "offset", "nested_absmax", "nested_code")


def packed_nbytes(numel: int) -> int:
    """Bytes of `numel` NF4 values (two per byte, the last half-filled when numel is odd)."""
    return (numel + 1) // 2


def _tensor(name: str, t, dtype: torch.dtype, numel, device: torch.device, why: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"NF4 state: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"NF4 state: {name} has dtype {t.dtype}, expected {dtype} ({why})")
    require(t.numel() == numel, f"NF4 state: {name} has {t.numel()} elements, expected {numel} ({why})")
    if t.device != device:
        raise ValueError(f"NF4 state: {name} is on {t.device}, the rest of the weight on {device}")


def _check_code(code: torch.Tensor) -> None:
    """The codebook's values: the kernels use the NF4 values, so another table must not pass."""
    if is_fake(code):
        return
    want = reference.nf4_code(code.device)
    if code.device.type == "cpu":
        if not torch.equal(code.reshape(-1), want):
            raise ValueError("NF4 state: code is not the NF4 codebook (bitsandbytes' quant_map for 'nf4')")
    elif not (code.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async((code.reshape(-1) == want).all(), "NF4 state: code is not the NF4 codebook")


def check_state(shape, dtype, blocksize, absmax, code, offset, nested_absmax, nested_code, nested_blocksize) -> None:
    """The one validator of an NF4 quant state (see `NF4QuantState`); `code` may be None."""
    if not isinstance(shape, Sequence) or not all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool)
                                                   for s in shape):
        raise TypeError(f"NF4 state: shape must be a sequence of ints, got {shape!r}")
    for s in shape:
        require(s >= 0, f"NF4 state: shape {tuple(shape)} has a negative size")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"NF4 state: dtype {dtype} is not one of {FLOAT_DTYPES}")
    reference.check_blocksize(blocksize)
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"NF4 state: absmax must be a torch.Tensor, got {type(absmax).__name__}")
    device = absmax.device
    blocks = -(-math.prod(shape) // blocksize)
    nested = (nested_absmax, nested_code, offset)
    if any(t is None for t in nested) and any(t is not None for t in nested):
        given = [n for n, t in zip(("nested_absmax", "nested_code", "offset"), nested) if t is not None]
        raise ValueError(f"NF4 state: double quant needs nested_absmax, nested_code and offset together; got only "
                         f"{', '.join(given)}")
    why = f"one per block of {blocksize} of a {tuple(shape)} weight"
    if nested_absmax is None:
        _tensor("absmax", absmax, torch.float32, blocks, device, why + ", fp32 without double quant")
    else:
        _tensor("absmax", absmax, torch.uint8, blocks, device, why + ", uint8 codes with double quant")
        if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize < 1 \
                or nested_blocksize & (nested_blocksize - 1):
            raise ValueError(f"NF4 state: nested_blocksize must be a positive power of two, got {nested_blocksize!r}")
        _tensor("nested_absmax", nested_absmax, torch.float32, -(-blocks // nested_blocksize), device,
                f"one per {nested_blocksize} absmax codes")
        _tensor("nested_code", nested_code, torch.float32, NESTED_CODE_SIZE, device, "the 8-bit code table")
        _tensor("offset", offset, torch.float32, 1, device, "the mean absmax, one value")
    if code is not None:
        _tensor("code", code, torch.float32, NF4_CODE_SIZE, device, "the NF4 codebook")
        _check_code(code)


@dataclass(frozen=True)
class NF4QuantState:
    """Everything needed to dequantize one packed NF4 tensor, checked when built.

    `absmax` is fp32, one per `blocksize` elements of the flattened weight; with double quant
    it holds uint8 codes of `absmax - offset`, dequantized by `nested_absmax` (fp32, one per
    `nested_blocksize` codes) through `nested_code` (fp32[256]); `offset` is one fp32 value.
    `code` is the NF4 codebook (bitsandbytes' `quant_map`, fp32[16]; None stands for it).
    Every tensor is on one device. A field of the wrong size, dtype or device raises here
    (`with_tensors` and `to` rebuild and re-check), before any kernel reads it.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = reference.NESTED_BLOCKSIZE

    def __post_init__(self):
        check_state(self.shape, self.dtype, self.blocksize, self.absmax, self.code, self.offset, self.nested_absmax,
                    self.nested_code, self.nested_blocksize)
        object.__setattr__(self, "shape", torch.Size(self.shape))
        for name in _STATE_TENSORS:
            t = getattr(self, name)
            if t is not None and not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous())

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (those that are set)."""
        return {k: getattr(self, k) for k in _STATE_TENSORS if getattr(self, k) is not None}

    def with_tensors(self, **tensors: torch.Tensor) -> NF4QuantState:
        return replace(self, **tensors)

    def to(self, device: torch.device | str) -> NF4QuantState:
        return self.with_tensors(**{k: v.to(device) for k, v in self.tensors().items()})


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Packed NF4 data as flat contiguous uint8, whatever its storage dtype (the same bytes)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype == torch.uint8 and packed.dim() == 1 and packed.is_contiguous():
        return packed
    packed = packed.contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.reshape(-1, 1).view(torch.uint8)
    return packed.reshape(-1)


@dataclass(frozen=True)
class NF4Weight:
    """A packed NF4 weight and its quant state, checked against each other: the one NF4 type
    the functional API, the modules and every backend pass around.

    `packed` is stored as flat uint8 bytes (a bf16 / fp32 quant storage is viewed, not
    copied), exactly `(numel + 1) // 2` of them, on the state's device. The op arguments
    (`op_args` / `from_op_args`) and the native kernels' pointers (`native_pointers`) are made
    here and nowhere else.
    """

    packed: torch.Tensor
    state: NF4QuantState

    def __post_init__(self):
        if not isinstance(self.state, NF4QuantState):
            raise TypeError(f"state must be an NF4QuantState, got {type(self.state).__name__}")
        flat = as_bytes(self.packed)
        want = packed_nbytes(self.state.numel)
        require(flat.numel() == want, f"packed holds {flat.numel()} bytes but a weight of shape "
                                      f"{tuple(self.state.shape)} needs {want}")
        if flat.device != self.state.device:
            raise ValueError(f"packed is on {flat.device} but its quant state on {self.state.device}")
        object.__setattr__(self, "packed", flat)

    # the state's fields, read by the kernels' launchers
    absmax = property(lambda self: self.state.absmax)
    nested_absmax = property(lambda self: self.state.nested_absmax)
    nested_code = property(lambda self: self.state.nested_code)
    offset = property(lambda self: self.state.offset)
    blocksize = property(lambda self: self.state.blocksize)
    nested_blocksize = property(lambda self: self.state.nested_blocksize)
    shape = property(lambda self: self.state.shape)
    dtype = property(lambda self: self.state.dtype)
    double_quant = property(lambda self: self.state.double_quant)
    numel = property(lambda self: self.state.numel)
    device = property(lambda self: self.state.device)

    def op_args(self) -> tuple:
        """(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize): the
        NF4 arguments of the ops, in their schema's order."""
        s = self.state
        return self.packed, s.absmax, s.nested_absmax, s.nested_code, s.offset, s.blocksize, s.nested_blocksize

    @classmethod
    def from_op_args(cls, packed, absmax, nested_absmax, nested_code, offset, blocksize: int, nested_blocksize: int,
                     shape: Sequence[int], dtype: torch.dtype) -> NF4Weight:
        """The weight an op received (`op_args` plus its shape and dtype), checked again."""
        state = NF4QuantState(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                              offset=offset, nested_absmax=nested_absmax, nested_code=nested_code,
                              nested_blocksize=nested_blocksize if nested_absmax is not None
                              else reference.NESTED_BLOCKSIZE)
        return cls(packed, state)

    def native_pointers(self) -> tuple[int, int, int, int, int, int]:
        """(packed, absmax fp32, absmax uint8 codes, nested_absmax, nested_code, offset) addresses
        as the C++ / CUDA kernels take them: 0 for what the weight does not have. The tensors
        stay alive as long as this weight does."""
        s = self.state
        if s.nested_absmax is None:
            return self.packed.data_ptr(), s.absmax.data_ptr(), 0, 0, 0, 0
        return (self.packed.data_ptr(), 0, s.absmax.data_ptr(), s.nested_absmax.data_ptr(),
                s.nested_code.data_ptr(), s.offset.data_ptr())

    def nbytes(self) -> int:
        """Bytes of the packed weight and every tensor of its state."""
        return self.packed.numel() + sum(t.numel() * t.element_size() for t in self.state.tensors().values())

    def to(self, device: torch.device | str) -> NF4Weight:
        return NF4Weight(self.packed.to(device), self.state.to(device))

    def dequantize_reference(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight through the reference (tests and fallbacks: it materializes W)."""
        s = self.state
        return reference.nf4_dequantize(self.packed, s.absmax, s.blocksize, s.shape, dtype or s.dtype,
                                        s.nested_absmax, s.nested_code, s.offset, s.nested_blocksize)
