"""The label conventions of kd, in one place.

Labels travel unshifted, aligned with `input_ids` (labels[i] is token i, or IGNORE_INDEX where position i carries no
loss: prompt, padding, a weightless filler sample). Only at the loss do logits and labels meet, shifted by one: logits
at position i predict labels[i + 1] (`shift` on logits, `labels[:, 1:]` on labels).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

# torch.nn.functional.cross_entropy's default ignore_index: labels built here feed torch's and HF's losses unchanged.
IGNORE_INDEX = -100


def shift(tensor: Optional[Tensor], vocab_size: Optional[int] = None) -> Optional[Tensor]:
    """Drop the last position so position i predicts token i+1; cut logits to the shared vocabulary (lm_head rows
    padded past the tokenizer, e.g. 152064 vs 151936, carry no meaning). A view, never a copy; None passes through."""
    if tensor is None:
        return None
    out = tensor[:, :-1]
    return out[..., :vocab_size] if vocab_size is not None else out
