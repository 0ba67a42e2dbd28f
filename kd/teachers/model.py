"""One frozen Hugging Face model as the teacher: an inference-only DeepSpeed ZeRO-3 engine or a plain replica."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from kd.models.heads import has_linear_head
from kd.teachers.base import TeacherInfo, TeacherOutput, TeacherRequest, hidden_selection


class ModelTeacher:
    """Wraps a frozen causal LM. With a ZeRO-3 config the model (constructed under zero.Init, so each rank only ever
    holds its shard) becomes a DeepSpeed engine without optimizer; DeepSpeed gathers the layers' parameters as the
    forward reaches them and frees them after, so teachers larger than one device fit."""

    def __init__(self, model: torch.nn.Module, ds_config: dict[str, Any] | None, device: torch.device, *,
                 name: str = ""):
        model.eval().requires_grad_(False)
        if ds_config is None:
            self.module = model.to(device)
            self.engine = None
        else:
            import deepspeed

            self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.engine.eval()
            self.module = self.engine.module
        self.device = device
        config = model.config
        self._info = TeacherInfo(
            name=name or getattr(config, "_name_or_path", "") or config.model_type,
            vocab_size=int(config.vocab_size), hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers), has_linear_head=has_linear_head(self.module), config=config,
            signals=("dense", "hidden") if has_linear_head(self.module) else ("dense",),
        )

    @property
    def info(self) -> TeacherInfo:
        return self._info

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], request: TeacherRequest = TeacherRequest()) -> TeacherOutput:
        """Teacher logits (``request.signal == "dense"``), plus its hidden states when asked: all of them, or only the
        entries ``request.hidden_layers`` names (in that order). transformers >= 5 takes the index list in
        ``output_hidden_states`` and keeps only those layers' outputs, so a loss reading one layer of a 32-layer
        teacher never holds the other 32 [B, L, H] tensors.

        ``signal == "hidden"``: the final hidden states instead of the logits. The model still runs whole (under
        ZeRO-3 the engine's forward is what drives the parameter gathering), with ``logits_to_keep=1`` so its head
        computes one position per sequence instead of the [B, L, V] logits."""
        if request.signal not in self._info.signals:
            raise ValueError(f"ModelTeacher cannot produce a {request.signal!r} signal (it has {self._info.signals})")
        forward = self.engine if self.engine is not None else self.module
        layers = hidden_selection(request)
        wanted: Any = layers if layers is not None else request.hidden
        extra = {}
        if request.signal == "hidden":
            # the last entry of hidden_states is the final-norm output (checked by tests/unit/engine/test_fused_path.py)
            if not request.hidden:
                wanted = [-1]  # only the final hidden state: the other layers' outputs are not kept
            elif layers is not None:
                wanted = list(dict.fromkeys([*layers, -1]))
            extra["logits_to_keep"] = 1
        out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=wanted, use_cache=False, **extra)
        hidden = None
        if request.hidden:
            # With a selection the tuple still has one slot per layer (None where not kept); models without output
            # capturing return them all. Indexing serves both.
            hidden = tuple(out.hidden_states[i] for i in layers) if layers is not None else out.hidden_states
        if request.signal == "dense":
            return TeacherOutput(logits=out.logits, hidden_states=hidden)
        return TeacherOutput(hidden_states=hidden, final_hidden=out.hidden_states[-1])

    @contextlib.contextmanager
    def head_weight(self) -> Iterator[torch.Tensor]:
        weight = self.module.get_output_embeddings().weight
        if not hasattr(weight, "ds_id"):
            yield weight
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight
