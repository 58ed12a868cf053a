"""Which decoders the beacon loop can serve, checked when an adapter is injected (before any change to the model).

The loop is generic (`layer.BeaconAttention` reads a Llama-family attention's ``q/k/v/o_proj``, ``head_dim``,
``scaling`` and optional ``q_norm``/``k_norm``; `forward` runs the unchanged decoder stack window by window), but
it relies on things a decoder might not do. Each is checked here, so that a decoder that breaks one is refused
with a `TypeError` naming the reason instead of failing inside a call or, worse, computing something else:

* one shared rotary embedding, called as ``rotary_emb(x, position_ids)`` (Gemma 3 and OLMo 3 keep one per layer
  type: refused);
* RoPE in the rotate-half convention that `rope.apply_rope` applies to the memory's keys (checked numerically
  against the modeling file's own ``apply_rotary_pos_emb``; Ernie 4.5's interleaved pairs: refused);
* no logit soft-capping inside attention (Gemma 2's ``attn_logit_softcapping``: refused; the beacon attention
  never applies it);
* decoder layers that hand their keyword arguments on to the attention module (the step's ``beacon_ctx`` travels
  that way; StableLM's and Nemotron's layers call their attention with a fixed argument list: refused);
* attention modules made of q/k/v/o projections and optional query/key norms only (BitNet's sub-norm and Doge's
  dynamic mask would be skipped: refused), rotating every layer (SmolLM3's and EXAONE 4's layers without RoPE:
  refused).
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap

import torch
from torch import nn

from .rope import apply_rope

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
KNOWN_ATTENTION_CHILDREN = ATTENTION_PARTS + ("q_norm", "k_norm")
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


def check_architecture(model: nn.Module, decoder: nn.Module) -> None:
    """Refuse (TypeError) a decoder the beacon loop would run wrongly; see the module docstring."""
    name = type(model).__name__
    _check_rotary_call(name, decoder.rotary_emb)
    attentions = [(layer, attn_name, attn) for layer in decoder.layers for attn_name, attn in layer.named_children()
                  if all(hasattr(attn, part) for part in ATTENTION_PARTS)]
    parsed = set()  # the source checks run once per class (a 7B model has 32-80 alike layers)
    for layer, attn_name, attn in attentions:
        _check_children(name, attn)
        _check_softcap(name, attn, decoder.config)
        if (type(layer), attn_name, type(attn)) not in parsed:
            _check_rope_always(name, attn)
            _check_passes_kwargs(name, layer, attn_name)
            parsed.add((type(layer), attn_name, type(attn)))
    if attentions:
        _check_rope_convention(name, decoder.rotary_emb, attentions[0][2])


def _check_rotary_call(name: str, rotary: nn.Module) -> None:
    params = list(inspect.signature(rotary.forward).parameters.values())
    required = [p.name for p in params
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 2:  # (x, position_ids) and nothing else
        raise TypeError(f"{name} is not supported: its rotary embedding {type(rotary).__name__} needs "
                        f"{required[2:]} besides (x, position_ids), i.e. different RoPE per layer type (Gemma 3, "
                        f"OLMo 3); beacon_peft serves decoders with one shared rotary embedding (Llama, Mistral, "
                        f"Qwen2, Qwen3, ...)")


def _check_children(name: str, attn: nn.Module) -> None:
    """Submodules other than the projections and query/key norms are computation the beacon attention would skip
    (BitNet's attn_sub_norm, Doge's dt_proj dynamic mask)."""
    unknown = [child for child, _ in attn.named_children() if child not in KNOWN_ATTENTION_CHILDREN]
    if unknown:
        raise TypeError(f"{name} is not supported: its attention {type(attn).__name__} has submodules {unknown} "
                        f"that the beacon attention would skip (it computes q/k/v/o_proj with optional q_norm/k_norm)")


def _check_rope_always(name: str, attn: nn.Module) -> None:
    """Every layer must rotate its queries and keys: an ``apply_rotary_pos_emb`` under an ``if`` in the attention's
    forward means some layers skip RoPE (SmolLM3's and EXAONE 4's NoPE layers), which the memory's keys would not."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(attn).forward)))
    except (OSError, TypeError, SyntaxError):
        return
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == ROPE_FN:
            up = parents.get(node)
            while up is not None and not isinstance(up, ast.FunctionDef):
                if isinstance(up, (ast.If, ast.IfExp)):
                    raise TypeError(f"{name} is not supported: {type(attn).__name__}.forward applies RoPE only under "
                                    f"a condition (layers without positions, NoPE), while the beacon attention "
                                    f"rotates every layer's queries and keys")
                up = parents.get(up)


def _check_softcap(name: str, attn: nn.Module, config) -> None:
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(attn, "config", config), "attn_logit_softcapping", None)
    if cap is not None:
        raise TypeError(f"{name} is not supported: its attention soft-caps the logits (attn_logit_softcapping="
                        f"{cap}), which the beacon attention does not apply, so its outputs would differ from the "
                        f"model's own")
    dropout = getattr(attn, "residual_dropout", 0.0) or 0.0
    if dropout > 0:  # StarCoder2 drops out the attention's output in training; the beacon attention does not
        raise TypeError(f"{name} with residual_dropout={dropout} is not supported: the beacon attention does not apply "
                        f"dropout to the attention output; allowed residual_dropout=0.0 (set it in the model config)")


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


def _check_rope_convention(name: str, rotary: nn.Module, attn: nn.Module) -> None:
    """Compare the modeling file's ``apply_rotary_pos_emb`` with `rope.apply_rope` on random keys."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    buffers = list(rotary.buffers())
    device = buffers[0].device if buffers else torch.device("cpu")
    if fn is None or device.type == "meta":
        return  # nothing to compare with (or no numbers: a meta-device model)
    head_dim = attn.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 7, head_dim, generator=gen).to(device)  # (B, H, T, D)
    k = torch.randn(1, 1, 7, head_dim, generator=gen).to(device)
    with torch.no_grad():
        cos, sin = rotary(q, torch.arange(3, 10, device=device)[None])  # (1, T, Dr)
        try:
            want_q, want_k = fn(q, k, cos, sin)[:2]
        except Exception:  # another signature: no verdict
            return
        got_q, got_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if want_q.shape != got_q.shape or not (torch.allclose(want_q.float(), got_q.float(), atol=1e-4)
                                           and torch.allclose(want_k.float(), got_k.float(), atol=1e-4)):
        raise TypeError(f"{name} is not supported: its RoPE ({type(attn).__module__}.apply_rotary_pos_emb) is not "
                        f"the rotate-half convention beacon_peft applies to the memory's keys (e.g. interleaved "
                        f"pairs), so compressed and raw keys would be rotated differently")
