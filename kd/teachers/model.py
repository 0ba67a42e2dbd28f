"""One frozen Hugging Face model as the teacher: an inference-only DeepSpeed ZeRO-3 engine or a plain replica."""
from __future__ import annotations

from typing import Any, Optional, Sequence

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
    def __call__(self, batch: dict[str, torch.Tensor], *, hidden_states: bool = False,
                 layers: Optional[Sequence[int]] = None) -> TeacherOutput:
        """Teacher logits, plus its hidden states when asked: all of them, or only the entries ``layers`` names (in
        that order). transformers >= 5 takes the index list in ``output_hidden_states`` and keeps only those layers'
        outputs, so a loss reading one layer of a 32-layer teacher never holds the other 32 [B, L, H] tensors."""
        forward = self.engine if self.engine is not None else self.module
        select = hidden_states and layers is not None
        out = forward(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=list(layers) if select else hidden_states,
            use_cache=False,
        )
        if not hidden_states:
            return TeacherOutput(logits=out.logits)
        # With a selection the tuple still has one slot per layer (None where not kept); models without output
        # capturing return them all. Indexing serves both.
        hidden = tuple(out.hidden_states[i] for i in layers) if select else out.hidden_states
        return TeacherOutput(logits=out.logits, hidden_states=hidden)
