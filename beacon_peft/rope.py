"""Rotary position embedding helpers that work for any HF rotary module: the ``rotate_half`` convention itself
(`apply_rope`) or, per layer (`LayerRope`), the modeling file's own convention, tables per layer type and layers
without RoPE.

Memory keys of the sink and of the open window's raw cache are stored *before* RoPE and rotated at every step
with their current positions (as the official code does); compressed beacon keys are rotated once, when they
enter the compressed memory, at the position they keep from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

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


@dataclass(frozen=True)
class LayerRope:
    """How one layer rotates its queries and keys: which rotary table it reads and in which convention.

    ``table``: the layer type whose tables it reads (Gemma 3's and OLMo 3's ``sliding_attention`` /
    ``full_attention`` bases; None: the decoder's one shared table). ``convention``: the modeling file's own
    ``apply_rotary_pos_emb(q, k, cos, sin)`` where it is not the rotate-half of `apply_rope` (interleaved pairs,
    half-width tables), None for `apply_rope` itself. ``on=False``: a layer without RoPE (NoPE), whose keys are
    never rotated, so re-basing positions onto the memory does not concern it."""

    table: Optional[str] = None
    convention: Optional[Callable] = None
    on: bool = True
    normed_after: bool = False  # the layer normalises its keys after RoPE (HunYuan): no way back to pre-RoPE keys

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, T, D) rotated to the positions of ``cos``/``sin`` (B, T, Dr)."""
        if not self.on:
            return x
        if self.convention is None:
            return apply_rope(x, cos, sin)
        return as_dtype(self.convention(x, x[:, :0], cos, sin)[0], x.dtype)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Inverse of `rotate`. Any RoPE convention turns each pair of dimensions by the matrix ``[[c, -s], [s, c]]``,
        whose inverse is ``[[c, s], [-s, c]] / (c^2 + s^2)``: the same convention with ``(c, -s) / (c^2 + s^2)``."""
        if not self.on:
            return x
        if self.normed_after:
            raise ValueError("this layer normalises its keys after RoPE (query/key norms after the rotation, as "
                             "HunYuan's): its compressed keys cannot be turned back into keys before RoPE; read them "
                             "with pre_rope=False")
        if self.convention is None:
            return unapply_rope(x, cos, sin)
        scale = cos * cos + sin * sin
        return self.rotate(x, cos / scale, -sin / scale)


def rotary_tables(rotary: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor,
                  tables: Iterable[Optional[str]]) -> dict:
    """The decoder's rotary embedding at ``positions`` (B, P) for every table in ``tables`` (None: the shared one;
    a layer type: ``rotary(x, positions, layer_type)``): ``{table: (cos, sin)}``, each (B, P, Dr)."""
    return {t: rotary(x, positions) if t is None else rotary(x, positions, t) for t in tables}


class DecoderRope:
    """The decoder's rotary embedding with every layer's `LayerRope`: the tables a group needs, and a layer's keys
    turned back to before RoPE (`memory.BeaconMemory.layer_kv`)."""

    def __init__(self, rotary: torch.nn.Module, layers: list[LayerRope]):
        self.rotary = rotary
        self.layers = layers
        self.tables = sorted({r.table for r in layers}, key=lambda t: "" if t is None else t)

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        """``{table: (cos, sin)}`` (B, P, Dr) at ``positions`` (B, P) for every table a layer reads."""
        return rotary_tables(self.rotary, x, positions, self.tables)

    def rotate(self, layer: int, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s keys ``k`` (B, H, T, D) before RoPE, rotated to ``positions`` (B, T) as that layer
        rotates them (its table and convention; unchanged in a layer without RoPE)."""
        rope = self.layers[layer]
        if not rope.on:
            return k
        cos, sin = rotary_tables(self.rotary, k, positions, [rope.table])[rope.table]
        return rope.rotate(k, cos, sin)

    def unrotate(self, layer: int, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s keys ``k`` (B, H, T, D), rotated to ``positions`` (B, T), back before RoPE."""
        rope = self.layers[layer]
        if not rope.on:
            return k
        cos, sin = rotary_tables(self.rotary, k, positions, [rope.table])[rope.table]
        return rope.unrotate(k, cos, sin)


def decoder_rope(decoder: torch.nn.Module) -> DecoderRope:
    """The decoder's rotary embedding with the `LayerRope` of each wrapped attention layer (``anatomy.rope`` of the
    beacon attentions, in layer order; a layer not wrapped reads the shared table in rotate-half)."""
    found = {m.layer_idx: m.anatomy.rope for m in decoder.modules()
             if isinstance(getattr(getattr(m, "anatomy", None), "rope", None), LayerRope)}
    return DecoderRope(decoder.rotary_emb, [found.get(i, LayerRope()) for i in range(decoder.config.num_hidden_layers)])
