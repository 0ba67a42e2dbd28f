"""Which causal LMs compute their logits as a plain linear head over the final hidden state.

The fused-linear loss path applies the lm_head itself (one block of rows at a time), so it is only exact for models
whose ``logits = final_hidden @ lm_head.weight^T``: no bias, no logit scaling or soft-capping after the head. Those
are listed by architecture (HF ``model_type``) rather than guessed from attributes, because a post-head transform
lives in the model's forward code, not in its modules.
"""
from __future__ import annotations

import torch

LINEAR_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def has_linear_head(model: torch.nn.Module) -> bool:
    """True when ``model``'s logits are exactly its final (post-norm) hidden state times the lm_head weight."""
    head = model.get_output_embeddings()
    return (getattr(model.config, "model_type", None) in LINEAR_HEAD_MODEL_TYPES
            and isinstance(head, torch.nn.Linear) and head.bias is None)
