"""One frozen Hugging Face model as the teacher: an inference-only DeepSpeed ZeRO-3 engine or a plain replica."""
from __future__ import annotations

from typing import Any

import torch

from kd.teachers.base import TeacherOutput


class ModelTeacher:
    """Wraps a frozen causal LM. With a ZeRO-3 config the model (constructed under zero.Init, so each rank only ever
    holds its shard) becomes a DeepSpeed engine without optimizer; DeepSpeed gathers the layers' parameters as the
    forward reaches them and frees them after, so teachers larger than one device fit."""

    def __init__(self, model: torch.nn.Module, ds_config: dict[str, Any] | None, device: torch.device):
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
        self._vocab_size = int(model.config.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], *, hidden_states: bool = False) -> TeacherOutput:
        forward = self.engine if self.engine is not None else self.module
        out = forward(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=hidden_states,
            use_cache=False,
        )
        return TeacherOutput(logits=out.logits, hidden_states=out.hidden_states if hidden_states else None)
