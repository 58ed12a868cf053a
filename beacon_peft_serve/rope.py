"""Rotary position embedding (``rotate_half`` convention): applying it, and its tables from a saved config.

`apply_rope` is the one implementation (`beacon_peft.rope` and the beacon attention use it). `rope_tables`
computes cos/sin for positions from the base model's config fields that a saved memory records (its base
fingerprint: ``rope_parameters`` or ``rope_theta``/``rope_scaling``, ``head_dim``), as transformers' rotary
embedding does, for the rope types ``default``, ``linear`` and ``llama3`` (Llama 2/3.x, Mistral, Qwen2/2.5/3,
SmolLM2); another type is refused with a ValueError (pass the model's own rotary embedding instead).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_TYPES = ("default", "linear", "llama3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (itself when it already is: no op dispatched)."""
    return x if x.dtype == dtype else x.to(dtype)


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


def rope_parameters(config: dict) -> dict:
    """The rope settings of a saved base config (transformers 5 ``rope_parameters``, else ``rope_scaling`` plus
    ``rope_theta``), with ``rope_type`` and ``rope_theta`` always present."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = dict(params)
    params.setdefault("rope_theta", config.get("rope_theta"))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_theta"] is None:
        raise ValueError("the saved base config names no rope_theta: pass the model's rotary embedding as rope=")
    return params


def inverse_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    """(Dr / 2,) float32 inverse frequencies of the saved base ``config`` (see the module docstring)."""
    p = rope_parameters(config)
    kind = p["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r} is not computed here: allowed {list(ROPE_TYPES)} (pass the model's own "
                         "rotary embedding as rope=)")
    dim = int(head_dim * p.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
    inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv = inv / p["factor"]
    elif kind == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_tables(config: dict, head_dim: int, positions: torch.Tensor,
                dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, T, Dr) for ``positions`` (T,), computed in float32 as transformers does, then cast to
    ``dtype`` (the keys' dtype, as the model's rotary embedding hands them out)."""
    inv = inverse_frequencies(config, head_dim)
    freqs = positions.float()[:, None] * inv[None, :]  # (T, Dr/2): one product each, as the model's outer product
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    cos, sin = emb.cos(), emb.sin()
    return (cos, sin) if dtype is None else (cos.to(dtype), sin.to(dtype))
