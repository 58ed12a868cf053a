"""Rotary position embedding helpers that work for any HF rotary module (``rotate_half`` convention).

Memory keys of the sink and of the open window's raw cache are stored *before* RoPE and rotated at every step
with their current positions (as the official code does); compressed beacon keys are rotated once, when they
enter the compressed memory, at the position they keep from then on.
"""

from __future__ import annotations

import torch

from beacon_peft_serve.rope import apply_rope, as_dtype, rotate_half  # noqa: F401  (one implementation)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope` (also when cos/sin carry an attention scaling factor)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    scale = cos * cos + sin * sin
    head = ((head * cos) - (rotate_half(head) * sin)) / scale
    return torch.cat((head, tail), dim=-1) if tail.shape[-1] else head
