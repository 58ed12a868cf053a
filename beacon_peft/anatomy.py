"""What one decoder attention module is made of, found by role rather than by one modeling file's names.

The beacon attention (`layer.BeaconAttention`) recomputes a wrapped attention module from its parts: the query,
key, value and output projections (separate, or one fused q/k/v projection cut into row slices), optional
query/key norms (before or after RoPE), the layer's rotary table and convention (`rope.LayerRope`), logit
soft-capping and learned attention sinks. `Anatomy` names those parts for one module; `support` fills in what
names cannot tell (the fused layout, the norms' place, RoPE on or off, the convention) by probing the module
against its own forward, and refuses a module whose probe no reading reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from torch import nn

from .rope import LayerRope

# names each role goes by in transformers' modeling files (Llama; GPT-NeoX; Phi-3; Baichuan; HunYuan; ...)
ROLE_NAMES = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj", "dense", "out_proj"),
}
FUSED_NAMES = ("qkv_proj", "query_key_value", "W_pack")
NORM_NAMES = {"q": ("q_norm", "query_layernorm", "q_layernorm"), "k": ("k_norm", "key_layernorm", "k_layernorm")}
SINK_NAMES = ("sinks",)
# how a fused q/k/v projection's output rows are ordered: "blocks" = [all q | all k | all v] (Phi-3, Baichuan),
# "heads" = per head [q_h | k_h | v_h] (GPT-NeoX: viewed as (heads, 3 * head_dim) and chunked)
FUSED_LAYOUTS = ("blocks", "heads")


def _child(attn: nn.Module, names) -> Optional[str]:
    return next((n for n in names if isinstance(getattr(attn, n, None), nn.Module)), None)


@dataclass(frozen=True)
class Anatomy:
    """The parts of one attention module. ``parts[role]``: (module name, rows) for q, k, v, o (rows None: the whole
    module; else the (out,) rows of a fused projection). Built by `find` and completed by `support`'s probe."""

    parts: dict
    head_dim: int
    heads: int
    kv_heads: int
    fused: Optional[str] = None  # the fused q/k/v projection's name, if any
    layout: Optional[str] = None  # its row layout, one of FUSED_LAYOUTS
    norms: dict = field(default_factory=dict)  # role ("q", "k") -> norm module name
    norm_after_rope: bool = False  # HunYuan normalises the rotated queries/keys
    rope: LayerRope = LayerRope()
    softcap: Optional[float] = None
    sinks: Optional[str] = None  # a learned per-head sink logit (gpt-oss)

    # --- the base projections --------------------------------------------------------------------------
    def module(self, attn: nn.Module, role: str) -> nn.Module:
        return getattr(attn, self.parts[role][0])

    def rows(self, role: str) -> Optional[torch.Tensor]:
        return self.parts[role][1]

    def in_out(self, attn: nn.Module, role: str) -> tuple[int, int]:
        """(out_features, in_features) of the role's projection (a fused one's slice; a packed 4-bit weight's
        shape is not its logical one)."""
        proj = self.module(attn, role)
        weight = proj.weight
        out_f = getattr(proj, "out_features", None) or weight.shape[0]
        in_f = getattr(proj, "in_features", None) or weight.shape[1]
        rows = self.rows(role)
        return (out_f if rows is None else len(rows)), in_f

    def has_bias(self, attn: nn.Module, role: str) -> bool:
        return getattr(self.module(attn, role), "bias", None) is not None

    def base_qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base projections of ``x`` (B, T, H): q (B, T, Hq * D), k and v (B, T, Hkv * D)."""
        if self.fused is None:
            return tuple(getattr(attn, self.parts[r][0])(x) for r in "qkv")
        out = getattr(attn, self.fused)(x)  # (B, T, Hq * D + 2 * Hkv * D)
        if self.layout == "heads":
            q, k, v = out.view(*out.shape[:-1], -1, 3 * self.head_dim).chunk(3, dim=-1)  # (B, T, H, D) each
            return q.flatten(-2), k.flatten(-2), v.flatten(-2)
        q_end = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return out[..., :q_end], out[..., q_end:q_end + kv], out[..., q_end + kv:]

    def norm(self, attn: nn.Module, role: str) -> Optional[nn.Module]:
        name = self.norms.get(role)
        return None if name is None else getattr(attn, name)

    def sink_logits(self, attn: nn.Module) -> Optional[torch.Tensor]:
        return None if self.sinks is None else getattr(attn, self.sinks)

    def with_layout(self, layout: str) -> "Anatomy":
        """The same fused projection read in ``layout`` (its q/k/v rows recomputed)."""
        return replace(self, layout=layout, parts={**self.parts, **_fused_rows(self.fused, layout, self.heads,
                                                                               self.kv_heads, self.head_dim)})


def _fused_rows(name: str, layout: str, heads: int, kv_heads: int, head_dim: int) -> dict:
    D = head_dim
    if layout == "heads":  # (heads, 3, D): q of head h at rows 3hD .. 3hD + D - 1
        base = np.arange(heads)[:, None] * 3 * D + np.arange(D)[None]
        return {r: (name, torch.from_numpy((base + i * D).reshape(-1))) for i, r in enumerate("qkv")}
    q_end, kv = heads * D, kv_heads * D
    spans = {"q": (0, q_end), "k": (q_end, q_end + kv), "v": (q_end + kv, q_end + 2 * kv)}
    return {r: (name, torch.arange(a, b)) for r, (a, b) in spans.items()}


def head_dim_of(attn: nn.Module) -> Optional[int]:
    config = getattr(attn, "config", None)
    dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or getattr(config, "head_dim", None)
    if dim is None and config is not None:
        dim = config.hidden_size // config.num_attention_heads
    return dim


def find(attn: nn.Module) -> Optional[Anatomy]:
    """The parts of ``attn`` found by name (None when it is no attention module: no q/k/v and output projection).
    A fused projection is read in the first layout; `support` probes the others."""
    o = _child(attn, ROLE_NAMES["o"])
    separate = {r: _child(attn, ROLE_NAMES[r]) for r in "qkv"}
    fused = None if all(separate.values()) else _child(attn, FUSED_NAMES)
    if o is None or (fused is None and not all(separate.values())):
        return None
    config = getattr(attn, "config", None)
    D = head_dim_of(attn)
    if D is None or config is None:
        return None
    heads, kv_heads = _head_counts(attn, separate, fused, D, config)
    norms = {r: n for r in "qk" if (n := _child(attn, NORM_NAMES[r])) is not None}
    sinks = next((n for n in SINK_NAMES if isinstance(getattr(attn, n, None), nn.Parameter)), None)
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(config, "attn_logit_softcapping", None)
    parts = {"o": (o, None)}
    if fused is None:
        parts.update({r: (separate[r], None) for r in "qkv"})
        return Anatomy(parts, D, heads, kv_heads, norms=norms, softcap=cap, sinks=sinks)
    anatomy = Anatomy(parts, D, heads, kv_heads, fused=fused, layout=FUSED_LAYOUTS[0], norms=norms, softcap=cap,
                      sinks=sinks)
    return anatomy.with_layout(FUSED_LAYOUTS[0])


def _out_features(proj: nn.Module) -> int:
    return getattr(proj, "out_features", None) or proj.weight.shape[0]


def _head_counts(attn: nn.Module, separate: dict, fused: Optional[str], head_dim: int, config) -> tuple[int, int]:
    """(query heads, key/value heads), read off the projections' widths (a config's ``num_key_value_heads`` may be
    absent or, for a fused projection, say nothing of its layout)."""
    if fused is None:
        return (_out_features(getattr(attn, separate["q"])) // head_dim,
                _out_features(getattr(attn, separate["k"])) // head_dim)
    heads = config.num_attention_heads
    return heads, (_out_features(getattr(attn, fused)) // head_dim - heads) // 2


def known_children(anatomy: Anatomy) -> set:
    """The submodules the beacon attention recomputes (the rest would be skipped)."""
    names = {name for name, _ in anatomy.parts.values()} | set(anatomy.norms.values())
    return names | ({anatomy.fused} if anatomy.fused else set())
