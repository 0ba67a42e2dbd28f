"""Student initialised from a subset of the teacher's decoder layers (``student.init_from_teacher_layers``).

The student is the teacher's architecture with fewer layers: same config except ``num_hidden_layers`` (and per-layer
lists such as ``layer_types`` cut to the kept layers). Its weights are the teacher's embeddings, final norm, lm_head
(unless tied to the embeddings) and, for student layer i, teacher layer ``layers[i]``.

Teacher weights are read tensor by tensor from the teacher's safetensors files, so a 70B teacher never sits in memory
a second time next to its sharded copy. The copy is planned (every student tensor mapped to a teacher tensor with the
right shape) before anything is written, so a mismatch fails cleanly.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from kd.errors import UserError
from kd.models.zero3 import assign_full, full_shape, is_partitioned

# Config attributes that hold one entry per decoder layer and must be cut like the layers.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
_KEY = "student.init_from_teacher_layers"


class TensorSource(Protocol):
    """Where teacher tensors come from: ``keys()`` and ``get(name)`` returning the full tensor."""

    def keys(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsSource:
    """Teacher tensors read lazily from a directory of safetensors files (single file or sharded with an index)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        else:
            from safetensors import safe_open

            weight_map = {}
            for name in sorted(os.listdir(directory)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(directory, name), framework="pt") as handle:
                        weight_map.update({key: name for key in handle.keys()})
        self._dir = directory
        self._where = weight_map
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}

    @staticmethod
    def available(directory: str) -> bool:
        """True when ``directory`` holds safetensors weights this class can read."""
        return os.path.isdir(directory) and any(n.endswith(".safetensors") for n in os.listdir(directory))

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._where[name]
        if file not in self._handles:  # each shard is opened once and memory-mapped
            self._handles[file] = self._stack.enter_context(safe_open(os.path.join(self._dir, file), framework="pt"))
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


class StateDictSource:
    """Teacher tensors from an in-memory state dict (fallback for GGUF or inline-config teachers)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self._state = state_dict

    def keys(self) -> set[str]:
        return set(self._state)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        pass


class MissingTeacherTensors(KeyError):
    """The teacher source lacks tensors the student needs (e.g. a checkpoint stored under legacy key names)."""


def student_config_from_teacher(teacher_config: Any, layers: Sequence[int]) -> Any:
    """The teacher's config with ``len(layers)`` decoder layers and per-layer lists cut to ``layers``.

    Raises UserError (key student.init_from_teacher_layers) for an index outside ``0..N-1``.
    """
    count = getattr(teacher_config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UserError(
            f"init_from_teacher_layers needs a decoder-only teacher config with num_hidden_layers; "
            f"{type(teacher_config).__name__} has none",
            key=_KEY,
        )
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise UserError(
            f"layer indices {bad} are out of range: the teacher has {count} layers, so indices must be 0..{count - 1}",
            key=_KEY,
        )
    values = teacher_config.to_dict()
    for name in PER_LAYER_LISTS:
        if isinstance(values.get(name), list) and len(values[name]) == count:
            values[name] = [values[name][i] for i in layers]
    values["num_hidden_layers"] = len(layers)
    # from_dict re-runs the config's own validation (e.g. len(layer_types) == num_hidden_layers).
    return type(teacher_config).from_dict(values)


def decoder_layers_prefix(model: nn.Module) -> str:
    """Dotted name of the ModuleList holding the decoder layers (``model.layers`` for Llama/Qwen)."""
    count = model.config.num_hidden_layers
    found = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == count]
    if not found:
        raise RuntimeError(f"{type(model).__name__}: no ModuleList with {count} decoder layers")
    # The outermost match: nested lists (e.g. experts inside a layer) of the same length sit deeper.
    return min(found, key=lambda name: name.count("."))


def _teacher_key(student_key: str, prefix: str, layers: Sequence[int]) -> str:
    head = prefix + "."
    if not student_key.startswith(head):
        return student_key
    index, rest = student_key[len(head):].split(".", 1)
    return f"{head}{layers[int(index)]}.{rest}"


def _student_tensors(model: nn.Module) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Each distinct parameter / persistent buffer with all of its names (tied weights share one entry)."""
    by_identity: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), ([], param))[0].append(name)
    persistent = set(model.state_dict(keep_vars=True).keys())
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            by_identity.setdefault(id(buf), ([], buf))[0].append(name)
    yield from by_identity.values()


def plan_copy(model: nn.Module, layers: Sequence[int], source: TensorSource) -> list[tuple[torch.Tensor, str]]:
    """Map every student tensor to the teacher key it is copied from, checking presence and shape.

    Raises MissingTeacherTensors when parameters have no teacher tensor; buffers without one keep their constructed
    value (they are derived, e.g. rotary tables). A shape mismatch is a bug (RuntimeError).
    """
    prefix = decoder_layers_prefix(model)
    available = source.keys()
    plan, missing = [], []
    for names, tensor in _student_tensors(model):
        candidates = [_teacher_key(name, prefix, layers) for name in names]
        key = next((c for c in candidates if c in available), None)
        if key is None:
            if isinstance(tensor, nn.Parameter):
                missing.append(candidates[0])
            continue
        plan.append((tensor, key))
    if missing:
        raise MissingTeacherTensors(f"teacher tensors not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return plan


def copy_teacher_layers(model: nn.Module, layers: Sequence[int], source: TensorSource) -> int:
    """Copy teacher tensors into ``model`` (a student built by `student_config_from_teacher`); returns tensors copied.

    Under ZeRO-3 each parameter is gathered, written by rank 0 and re-partitioned, so only rank 0 reads the files.
    """
    plan = plan_copy(model, layers, source)
    zero3 = any(isinstance(t, nn.Parameter) and is_partitioned(t) for t, _ in plan)
    reads = not zero3 or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for tensor, key in plan:
        value = source.get(key) if reads or not isinstance(tensor, nn.Parameter) else None
        if value is not None and tuple(value.shape) != tuple(full_shape(tensor)):
            raise RuntimeError(f"{key}: teacher shape {tuple(value.shape)} != student {tuple(full_shape(tensor))}")
        assign_full(tensor, value)
    return len(plan)
