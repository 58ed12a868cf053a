"""Rotary position embedding helpers that work for any HF rotary module (``rotate_half`` convention).

Memory keys of the sink and of the open window's raw cache are stored *before* RoPE and rotated at every step
with their current positions (as the official code does); compressed beacon keys are rotated once, when they
enter the compressed memory, at the position they keep from then on.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) with ``cos``/``sin`` (B, T, Dr), Dr <= D (partial rotary keeps the tail).

    The result has ``x``'s dtype: a rotary embedding that hands out float32 tables for a half-precision model
    (OLMo's) rotates in float32 and casts back, as the model's own ``apply_rotary_pos_emb`` does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, Dr)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return as_dtype(x * cos + rotate_half(x) * sin, x.dtype)
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat((as_dtype(head * cos + rotate_half(head) * sin, x.dtype), tail), dim=-1)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (itself when it already is: no op dispatched)."""
    return x if x.dtype == dtype else x.to(dtype)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope` (also when cos/sin carry an attention scaling factor)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    scale = cos * cos + sin * sin
    head = ((head * cos) - (rotate_half(head) * sin)) / scale
    return torch.cat((head, tail), dim=-1) if tail.shape[-1] else head
