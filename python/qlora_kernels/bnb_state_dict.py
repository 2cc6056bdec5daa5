"""bitsandbytes-compatible state dicts for NF4 weights.

Keys under a weight `w` (as `Linear4bit` writes them): `w`, `w.absmax`, `w.quant_map`,
`w.nested_absmax`, `w.nested_quant_map` (double quant only) and
`w.quant_state.bitsandbytes__nf4`, a uint8 tensor holding JSON. The JSON is parsed, never
unpickled; every field and tensor is checked before anything is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from . import reference
from .nf4_weight import FLOAT_DTYPES, NF4QuantState, NF4Weight

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY, "quant_state.bitsandbytes__fp4")


class CheckpointError(ValueError):
    """A state dict that does not describe a valid NF4 weight."""


def state_to_dict(state: NF4QuantState) -> dict[str, torch.Tensor]:
    """The quant-state entries bitsandbytes writes beside the weight, in its order."""
    meta = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": _DTYPE_NAMES[state.dtype],
        "shape": list(state.shape),
    }
    out = {"absmax": state.absmax, "quant_map": reference.nf4_code(state.device) if state.code is None else state.code}
    if state.double_quant:
        out["nested_absmax"] = state.nested_absmax
        out["nested_quant_map"] = state.nested_code.clone()
        meta.update(
            nested_blocksize=state.nested_blocksize,
            nested_dtype=_DTYPE_NAMES[state.nested_absmax.dtype],
            nested_offset=state.offset.item(),
        )
    out[QUANT_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def _fail(where: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{where}: {msg}")


def _parse_meta(t: torch.Tensor, where: str) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise _fail(where, "quant_state.bitsandbytes__nf4 must be a 1-D uint8 tensor of JSON bytes")
    try:
        meta = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(where, f"quant_state JSON is corrupted or truncated ({exc})") from None
    if not isinstance(meta, dict):
        raise _fail(where, "quant_state JSON is not an object")
    return meta


def _field(meta: dict, key: str, kind, where: str):
    if key not in meta:
        raise _fail(where, f"quant_state JSON lacks {key!r}")
    value = meta[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(where, f"quant_state {key!r} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise _fail(where, f"quant_state {key!r} must be a finite number, got {value!r}")
    if kind is list and not isinstance(value, list):
        raise _fail(where, f"quant_state {key!r} must be a list, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise _fail(where, f"quant_state {key!r} must be a string, got {value!r}")
    return value


def _entry(entries: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in entries:
        raise _fail(where, f"missing {key!r}")
    if not isinstance(entries[key], torch.Tensor):
        raise _fail(where, f"{key!r} must be a tensor, got {type(entries[key]).__name__}")
    return entries[key]


def state_from_dict(entries: Mapping[str, torch.Tensor], where: str = "weight") -> NF4QuantState:
    """Parse and check the quant-state entries (keys without the weight prefix)."""
    if "quant_state.bitsandbytes__fp4" in entries:
        raise NotImplementedError(f"{where}: FP4 checkpoints are not supported, only NF4")
    if QUANT_STATE_KEY not in entries:
        raise _fail(where, f"missing {QUANT_STATE_KEY!r} (not a bitsandbytes NF4 weight?)")
    meta = _parse_meta(entries[QUANT_STATE_KEY], where)
    if _field(meta, "quant_type", str, where) != "nf4":
        raise NotImplementedError(f"{where}: quant_type {meta['quant_type']!r} is not supported, only 'nf4'")
    blocksize = _field(meta, "blocksize", int, where)
    dtype = _NAME_DTYPES.get(_field(meta, "dtype", str, where))
    if dtype not in FLOAT_DTYPES:
        raise _fail(where, f"dtype {meta['dtype']!r} is not one of {sorted(_NAME_DTYPES)}")
    code = _entry(entries, "quant_map", where)
    # read on the host: a wrong table on a GPU would otherwise surface as a device-side assert
    if code.dtype != torch.float32 or not torch.equal(code.detach().cpu().reshape(-1), reference.nf4_code()):
        raise _fail(where, "quant_map is not the NF4 codebook")
    # the shape, like every size below, is checked by the state's constructor
    fields = dict(shape=_field(meta, "shape", list, where), dtype=dtype, blocksize=blocksize, code=code,
                  absmax=_entry(entries, "absmax", where))
    if "nested_absmax" in entries or "nested_offset" in meta:
        if _field(meta, "nested_dtype", str, where) != "float32":
            raise _fail(where, f"nested_dtype {meta['nested_dtype']!r} is not supported, only 'float32'")
        absmax = fields["absmax"]
        fields.update(nested_blocksize=_field(meta, "nested_blocksize", int, where),
                      offset=torch.tensor(_field(meta, "nested_offset", float, where), dtype=torch.float32,
                                          device=absmax.device),
                      nested_absmax=_entry(entries, "nested_absmax", where),
                      nested_code=_entry(entries, "nested_quant_map", where))
    try:
        state = NF4QuantState(**fields)
    except (ValueError, TypeError) as exc:
        raise _fail(where, f"{exc} (truncated or mismatched checkpoint)") from None
    return state


def weight_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], key: str, expected_shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, NF4QuantState]:
    """The packed weight at `key` and its quant state, checked against each other."""
    if key not in state_dict:
        raise _fail(key, "missing")
    packed = state_dict[key]
    entries = {s: state_dict[f"{key}.{s}"] for s in _SUFFIXES if f"{key}.{s}" in state_dict}
    state = state_from_dict(entries, where=key)
    if expected_shape is not None and tuple(state.shape) != tuple(expected_shape):
        raise _fail(key, f"checkpoint weight has shape {tuple(state.shape)}, the layer expects {tuple(expected_shape)}")
    if not isinstance(packed, torch.Tensor):
        raise _fail(key, f"must be a tensor, got {type(packed).__name__}")
    try:
        NF4Weight(packed, state)
    except (ValueError, TypeError) as exc:
        raise _fail(key, f"{exc} (truncated or mismatched checkpoint)") from None
    return packed, state


def bits_per_parameter(packed: torch.Tensor, state: NF4QuantState) -> float:
    """Storage of the weight and its whole quant state as this state dict holds them, in bits
    per weight element."""
    weight = NF4Weight(packed, state)
    nbytes = weight.packed.numel() + sum(t.numel() * t.element_size() for t in state_to_dict(state).values())
    return 8.0 * nbytes / state.numel
