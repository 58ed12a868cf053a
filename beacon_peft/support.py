"""Which decoders the beacon loop can serve, checked when an adapter is injected (before any change to the model).

The loop is generic (`layer.BeaconAttention` recomputes a decoder attention from its parts, found by role in
`anatomy`; `forward` runs the unchanged decoder stack window by window), but it relies on things a decoder might
not do. What names cannot tell is *probed*: each attention module's own forward on a few random tokens is compared
with the beacon attention's recomputation (`layer.recompute`) under each reading of the module, and the first that
reproduces it is kept:

* the fused q/k/v projection's row layout (Phi-3's blocks, GPT-NeoX's per-head triples);
* whether the query/key norms act before RoPE (Qwen3, Gemma 3) or after it (HunYuan);
* whether the layer applies RoPE at all (SmolLM3's, EXAONE 4's and Cohere 2's layers without positions, NoPE);
* whether soft-capping applies (Gemma 2: the eager path applies ``attn_logit_softcapping``).

The rotary convention is checked numerically once (the modeling file's ``apply_rotary_pos_emb`` against
`rope.apply_rope`: where they differ, as Ernie 4.5's interleaved pairs or gpt-oss's half-width tables, the model's
own function rotates the memory's keys too); a rotary embedding that takes a ``layer_type`` gives each layer the
table of its type (Gemma 3, OLMo 3). A decoder is refused with a `TypeError` naming the reason, instead of failing
inside a call or, worse, computing something else, when:

* its attention has submodules the beacon attention would skip (BitNet's ``attn_sub_norm``, Doge's dynamic mask);
* its decoder layers call their attention without passing keyword arguments on (the step's ``beacon_ctx`` travels
  that way: StableLM, Nemotron);
* its rotary embedding needs arguments other than (x, position_ids[, layer_type]);
* StarCoder2-style ``residual_dropout > 0`` (the beacon attention does not apply it);
* no reading of an attention module reproduces its own output (the probe's difference is named).
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from . import anatomy
from .layer import recompute
from .rope import LayerRope, apply_rope, rotary_tables

ROPE_FN = "apply_rotary_pos_emb"


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.get_decoder()``), the part whose forward the window loop replaces;
    a TypeError when it has no ``layers`` or no shared ``rotary_emb``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "layers"):
        raise TypeError(
            f"{type(model).__name__} is not a supported decoder-only causal LM: beacon_peft needs a decoder "
            "(`model.get_decoder()`) with `layers` and a shared `rotary_emb` (Llama, Mistral, Qwen2, Qwen3, ...)"
        )
    return decoder


def check_architecture(model: nn.Module, decoder: nn.Module) -> dict:
    """Refuse (TypeError) a decoder the beacon loop would run wrongly (see the module docstring); else every
    attention module's `anatomy.Anatomy`, keyed by ``id(module)``."""
    name = type(model).__name__
    typed = _check_rotary_call(name, decoder.rotary_emb)
    layer_types = getattr(decoder.config, "layer_types", None) if typed else None
    attentions = [(i, layer, attn_name, attn, parts) for i, layer in enumerate(decoder.layers)
                  for attn_name, attn in layer.named_children() if (parts := anatomy.find(attn)) is not None]
    parsed = set()  # the source checks run once per class (a 7B model has 32-80 alike layers)
    convention = None
    found, liked = {}, {}
    for n, (i, layer, attn_name, attn, parts) in enumerate(attentions):
        _check_children(name, attn, parts)
        _check_dropout(name, attn)
        if (type(layer), attn_name, type(attn)) not in parsed:
            _check_passes_kwargs(name, layer, attn_name)
            parsed.add((type(layer), attn_name, type(attn)))
        table = layer_types[i] if layer_types is not None else None
        if n == 0:
            convention = _rope_convention(decoder.rotary_emb, attn, parts, table)
        parts = replace(parts, rope=LayerRope(table, convention))
        parts = _probe(name, decoder, i, attn, parts, liked.get(type(attn)))
        liked[type(attn)] = parts
        found[id(attn)] = parts
    return found


def _check_rotary_call(name: str, rotary: nn.Module) -> bool:
    """Whether the rotary embedding keeps one table per layer type (``forward(x, position_ids, layer_type)``)."""
    params = list(inspect.signature(rotary.forward).parameters.values())
    required = [p.name for p in params
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    typed = [p.name for p in params if p.name == "layer_type"]
    extra = [r for r in required[2:] if r != "layer_type"]
    if extra:
        raise TypeError(f"{name} is not supported: its rotary embedding {type(rotary).__name__} needs "
                        f"{extra} besides (x, position_ids, layer_type); beacon_peft serves decoders with one shared "
                        f"rotary embedding or one per layer type (Llama, Gemma 3, OLMo 3, ...)")
    return bool(typed)


def _check_children(name: str, attn: nn.Module, parts: anatomy.Anatomy) -> None:
    """Submodules other than the projections and query/key norms are computation the beacon attention would skip
    (BitNet's attn_sub_norm, Doge's dt_proj dynamic mask)."""
    known = anatomy.known_children(parts)
    unknown = [child for child, _ in attn.named_children() if child not in known]
    if unknown:
        raise TypeError(f"{name} is not supported: its attention {type(attn).__name__} has submodules {unknown} "
                        f"that the beacon attention would skip (it computes the q/k/v (or fused q/k/v) and output "
                        f"projections with optional query/key norms)")


def _check_dropout(name: str, attn: nn.Module) -> None:
    dropout = getattr(attn, "residual_dropout", 0.0) or 0.0
    if dropout > 0:  # StarCoder2 drops out the attention's output in training; the beacon attention does not
        raise TypeError(f"{name} with residual_dropout={dropout} is not supported: the beacon attention does not apply "
                        f"dropout to the attention output; allowed residual_dropout=0.0 (set it in the model config)")


def _rope_convention(rotary: nn.Module, attn: nn.Module, parts: anatomy.Anatomy, table):
    """None when the modeling file's ``apply_rotary_pos_emb`` is `rope.apply_rope`'s rotate-half (checked on random
    keys), else that function: the layers then rotate the memory's keys with the model's own convention."""
    fn = getattr(sys.modules.get(type(attn).__module__), ROPE_FN, None)
    buffers = list(rotary.buffers())
    device = buffers[0].device if buffers else torch.device("cpu")
    if fn is None or device.type == "meta":
        return None  # nothing to compare with (or no numbers: a meta-device model)
    head_dim = parts.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 7, head_dim, generator=gen).to(device)  # (B, H, T, D)
    k = torch.randn(1, 1, 7, head_dim, generator=gen).to(device)
    with torch.no_grad():
        cos, sin = rotary_tables(rotary, q, torch.arange(3, 10, device=device)[None], [table])[table]  # (1, T, Dr)
        try:
            want_q, want_k = fn(q, k, cos, sin)[:2]
        except Exception:  # another signature: no verdict
            return None
        got_q, got_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if want_q.shape == got_q.shape and torch.allclose(want_q.float(), got_q.float(), atol=1e-4) \
            and torch.allclose(want_k.float(), got_k.float(), atol=1e-4):
        return None
    return fn


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    buffers = list(module.buffers())
    return buffers[0].device if buffers else default


def _readings(parts: anatomy.Anatomy, liked: Optional[anatomy.Anatomy]):
    """Every reading of ``parts`` the probe may try, the one the previous layer of the class took first."""
    if liked is not None:
        yield replace(liked, rope=replace(liked.rope, table=parts.rope.table))
    for on in (True, False):
        for after in ((False, True) if parts.norms else (False,)):
            for cap in ((parts.softcap, None) if parts.softcap is not None else (None,)):
                for layout in (anatomy.FUSED_LAYOUTS if parts.fused else (None,)):
                    reading = replace(parts, norm_after_rope=after, softcap=cap,
                                      rope=replace(parts.rope, on=on, normed_after=after and "k" in parts.norms))
                    yield reading.with_layout(layout) if layout else reading


def _probe(name: str, decoder: nn.Module, index: int, attn: nn.Module, parts: anatomy.Anatomy,
           liked: Optional[anatomy.Anatomy]) -> anatomy.Anatomy:
    """The first reading of ``attn`` whose recomputation (`layer.recompute`) equals the module's own forward on a
    few random tokens; a TypeError naming the smallest difference when none does."""
    params = [p for p in attn.parameters()]
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        return parts  # no numbers to compare: read by name only
    dtype = decoder.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    T = 7
    gen = torch.Generator().manual_seed(index)
    # an input that requires grad, under autograd: bitsandbytes' CPU kernel would otherwise repack 4-bit weights in
    # place for inference (eval, no grad), and the probe must leave the model exactly as it was
    x = torch.randn(1, T, decoder.config.hidden_size, generator=gen).to(device, dtype).requires_grad_()  # (1, T, H)
    positions = torch.arange(3, 3 + T, device=_device_of(decoder.rotary_emb, device))[None]
    cos, sin = (t.to(device) for t in rotary_tables(decoder.rotary_emb, x, positions, [parts.rope.table])[
        parts.rope.table])
    mask = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    was_training = attn.training
    attn.train(False)
    best = float("inf")
    try:
        with torch.enable_grad():
            try:
                want = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)
            except Exception as err:  # noqa: BLE001 (any failure: the module is not called as a decoder attention)
                raise TypeError(f"{name} is not supported: its attention {type(attn).__name__} cannot be called as "
                                f"attn(hidden_states, position_embeddings, attention_mask) to be compared with the "
                                f"beacon attention ({type(err).__name__}: {err})") from None
            want = (want[0] if isinstance(want, tuple) else want).detach().float()
            scale = want.abs().max().item() + 1e-6
            for reading in _readings(parts, liked):
                try:
                    got = recompute(reading, attn, x, cos, sin, mask).detach().float()
                except (RuntimeError, ValueError):  # a reading the shapes do not allow
                    continue
                diff = (got - want).abs().max().item() / scale if got.shape == want.shape else float("inf")
                if diff <= tol:
                    return reading
                best = min(best, diff)
    finally:
        attn.train(was_training)
    raise TypeError(f"{name} is not supported: no reading of its attention {type(attn).__name__} (layer {index}) by "
                    f"the beacon attention reproduces its own output (smallest relative difference {best:.2g} on a "
                    f"probe; tried fused layouts, query/key norms before and after RoPE, with and without RoPE, "
                    f"with and without soft-capping), so compressed and raw tokens would be computed differently")


def _check_passes_kwargs(name: str, layer: nn.Module, attn_name: str) -> None:
    """The layer's forward must call ``self.<attn_name>(..., **kwargs)``; unknown when its source is unavailable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(layer).forward)))
    except (OSError, TypeError, SyntaxError):
        return
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == attn_name and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"]
    if calls and not any(kw.arg is None for call in calls for kw in call.keywords):
        raise TypeError(f"{name} is not supported: {type(layer).__name__}.forward calls self.{attn_name}(...) "
                        f"without passing its keyword arguments on, so the beacon attention cannot receive the "
                        f"step's memory (beacon_ctx)")
