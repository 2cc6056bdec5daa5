"""Sharded checkpoints of models holding NF4Linear layers (FSDP2 + torch.distributed.checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .bnb_state_dict import QUANT_STATE_KEY


def dcp_load(model: nn.Module, checkpoint_id: str | Path) -> None:
    """Load a `dcp.save(get_model_state_dict(model), checkpoint_id=...)` checkpoint into `model`
    (built and sharded like the saved one), on every rank.

    Plain `dcp.load` fails on NF4 layers: the `...weight.quant_state.bitsandbytes__nf4` entry is
    a JSON byte string whose length depends on its numbers (the double-quant offset), and DCP
    loads in place and refuses a size change. Each such entry is first given its saved size;
    then `set_model_state_dict` hands the loaded entries to NF4Linear's loader, which checks and
    parses them (nothing aliases the loaded buffers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    reader = dcp.FileSystemReader(str(checkpoint_id))
    saved = reader.read_metadata().state_dict_metadata
    state_dict = get_model_state_dict(model)
    for key in state_dict:
        if key.endswith(QUANT_STATE_KEY):
            if key not in saved:
                raise KeyError(f"{key} is not in the checkpoint {checkpoint_id}")
            state_dict[key] = torch.empty(saved[key].size, dtype=torch.uint8)
    dcp.load(state_dict, storage_reader=reader)
    set_model_state_dict(model, state_dict)
