"""Loading checkpoint files without running pickled code.

DeepSpeed saves with torch.save (pickle) and loads with weights_only=False, which would execute whatever a tampered
checkpoint contains. kd loads with weights_only=True and allows, besides tensors and plain containers, only the few
DeepSpeed state classes its checkpoints really hold (found by inspecting files, not by trusting them). A file naming
any other global is refused with a message that says which.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import serialization

from kd.errors import UserError

# DeepSpeed's own plain-data classes that appear in its checkpoints (enum of ZeRO stages, loss scaler state, the
# (start, numel) record of a ZeRO parameter fragment).
ALLOWED_PREFIXES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.",  # older checkpoints keep numpy RNG state arrays; array reconstruction runs no user code
)


def _allowed_globals(path: str) -> list[Any]:
    found = []
    for name in serialization.get_unsafe_globals_in_checkpoint(path):
        if not name.startswith(ALLOWED_PREFIXES):
            raise UserError(f"checkpoint file {path} contains a pickled {name}; kd loads checkpoints with "
                            "weights_only and refuses arbitrary objects. Only resume from checkpoints you wrote")
        module, _, attr = name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attr))
    if any(name.startswith("numpy") for name in map(lambda g: getattr(g, "__module__", ""), found)):
        import numpy

        # unpickling a dtype instantiates its concrete class, which the scan above does not list
        found += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return found


def safe_load(path: str, map_location: Any = None, *, mmap: bool | None = None) -> Any:
    """torch.load(weights_only=True) of `path`, allowing only the globals of `ALLOWED_PREFIXES`; `mmap` as torch.load's
    (export maps a whole model state instead of reading it into memory)."""
    try:
        allowed = _allowed_globals(path)
        with serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except UserError:
        raise
    except Exception as e:  # truncated or corrupt file: the user's checkpoint, not a kd bug
        raise UserError(f"cannot read checkpoint file {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        key="resume") from None


def check_tree(folder: str) -> int:
    """Refuse a checkpoint directory any of whose pickled files names a global outside the allowlist, before code
    that unpickles without weights_only reads it (DeepSpeed's ds_to_universal and load_universal do). Returns the
    number of files checked. Files that are not torch pickles (json, tokenizer, safetensors) are not checked."""
    checked = 0
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name.endswith((".pt", ".pth", ".bin")):
                path = os.path.join(root, name)
                try:
                    _allowed_globals(path)
                except UserError:
                    raise
                except Exception as e:  # unreadable: torch.load would fail on it too, with a worse message
                    raise UserError(f"cannot read checkpoint file {path}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]}", key="resume") from None
                checked += 1
    return checked


def install(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints through `safe_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
