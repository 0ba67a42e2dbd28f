"""Where generation gets its parameters: a rollout context around the decode loop.

- No ZeRO-3 (ZeRO 0-2 engines, replicas): every rank holds the whole model already; nothing to gather.
- ZeRO-3, gathered once (``gather: always``, or ``auto`` when the full model fits): the parameters are all-gathered
  once for the whole rollout (`deepspeed.zero.GatheredParameters`, modifier_rank=None: read-only) and DeepSpeed's
  per-module hooks are taken off for its duration. They must be: with the hooks on, every module's post-forward
  hook would re-partition the parameters we gathered, and the next token's forward would all-gather them again.
  This is what DeepSpeed's own `unwrap_model_for_generation` (runtime/zero/stage3.py) does; here it is undone in
  a `finally`, and the modules keep their DeepSpeed ids (re-registering would renumber them).
- ZeRO-3, layer by layer (``gather: never``, or ``auto`` when it does not fit): the hooks stay and gather each
  layer as the forward reaches it, for a model too big for one device. Every token's forward is then a collective,
  which is why the decode loop keeps all ranks in lockstep.

Afterwards every module's train/eval flag is exactly what it was (generation runs in eval mode, which also keeps
gradient checkpointing out of the way: Hugging Face only checkpoints in training mode, and its checkpointing
setting itself is never touched). The choice between once and layer by layer is agreed by all ranks.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Literal, Optional

import torch

from kd.engine import dist

GatherMode = Literal["auto", "always", "never"]
GATHER_MODES = ("auto", "always", "never")
FIT_FRACTION = 0.5  # of the free device memory the gathered model may take; the rest is for the KV cache


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _offload(engine: Any) -> Any:
    """The DeepSpeed object that owns a ZeRO-3 engine's module hooks (training engine: the optimizer's
    parameter_offload; inference-only engine: the DeepSpeedZeRoOffload that stands in for an optimizer)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if offload is None or not hasattr(offload, "forward_hooks"):
        raise ValueError("generation under ZeRO-3 needs the DeepSpeed engine whose hooks gather the parameters")
    return offload


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_gathered(model: torch.nn.Module) -> bool:
    """Collective: True on every rank when on every rank the missing part of the full parameters fits in
    FIT_FRACTION of the free device memory."""
    missing = sum((p.ds_numel - p.ds_tensor.numel()) * p.element_size() for p in model.parameters() if hasattr(p, "ds_id"))
    fits = missing <= FIT_FRACTION * _free_bytes(dist.device())
    return not dist.any_rank(not fits)


def plan_gather(model: torch.nn.Module, gather: GatherMode) -> str:
    """"replica" (nothing sharded), "once" or "layers". Collective under ZeRO-3 with ``auto``."""
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
    if not is_sharded(model):
        return "replica"
    if gather == "auto":
        return "once" if fits_gathered(model) else "layers"
    return "once" if gather == "always" else "layers"


@contextlib.contextmanager
def _hooks_off(offload: Any) -> Iterator[None]:
    ids = {m: m.ds_id for m in offload.module.modules() if hasattr(m, "ds_id")}
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)
        for module, ds_id in ids.items():
            module.ds_id = ds_id


class Rollout:
    """What the decode loop runs on: the model, how its parameters are held (`plan`), and the hook to call before
    each forward."""

    def __init__(self, model: torch.nn.Module, plan: str, before_forward=None):
        self.model, self.plan, self.before_forward = model, plan, before_forward


@contextlib.contextmanager
def rollout(model: torch.nn.Module, *, engine: Optional[Any] = None, gather: GatherMode = "auto") -> Iterator[Rollout]:
    """Context for generating with ``model`` (a Hugging Face causal LM; under ZeRO-3 a submodule of ``engine``'s
    module, e.g. the student inside the trained DistillationModule, or a teacher engine's module). Collective under
    ZeRO-3: every rank enters and leaves it together."""
    plan = plan_gather(model, gather)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if plan == "replica":
            yield Rollout(model, plan)
        elif plan == "layers":
            coordinator = _offload(engine).get_param_coordinator()
            # The engine's own forward resets DeepSpeed's fetch step at its root module; calling a submodule
            # directly does not, so each generation forward starts a fresh step here.
            yield Rollout(model, plan, before_forward=coordinator.reset_step)
        else:
            import deepspeed

            offload = _offload(engine)
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None), _hooks_off(offload):
                yield Rollout(model, plan)
    finally:
        for module, training in flags:
            module.training = training
