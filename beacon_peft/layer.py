"""`BeaconAttention`: the tuner layer PEFT wraps around every decoder attention module.

One class serves every Llama-family attention (Llama, Mistral, Qwen2, Qwen3, ...): it reads the wrapped
module's ``q/k/v/o_proj``, optional ``q_norm``/``k_norm``, ``head_dim`` and ``scaling``, so no modeling file
is forked. Raw tokens use the frozen base projections, beacon tokens use the adapter's beacon projections
(copies of the base ones, dequantized when the base is 4-bit). Attention runs over
``[sink ; compressed beacons ; raw cache ; chunk]`` with the step's mask through transformers' attention
functions (eager / sdpa, flash-attention for plain causal steps), and the layer hands back its next memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .config import BeaconConfig
from .memory import LayerMemory
from .rope import apply_rope
from .schedule import StepPlan


@dataclass
class ChunkContext:
    """What every layer needs for one step; passed through the decoder as the ``beacon_ctx`` keyword.

    It holds the memory of the step's start (never mutated, so a gradient-checkpointing replay reads the same
    inputs) and collects each layer's next memory in ``new_layers``.
    """

    adapter: str
    plan: StepPlan
    layers: list[Optional[LayerMemory]]
    mask_fn: Callable[[], torch.Tensor]  # builds the additive mask (B, 1, L, S + C + R + L), on first use
    mem_rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) (B, S + R, D) of the pre-RoPE memory parts
    comp_rope: Optional[tuple[torch.Tensor, torch.Tensor]]  # (cos, sin) (B, K, D) of entries entering the
    # compressed memory; None when no window completes
    new_layers: list[Optional[LayerMemory]]
    _mask: Optional[torch.Tensor] = None

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = self.mask_fn()
        return self._mask


def _cat_nonempty(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Concatenate along the sequence, without a copy when only one part holds entries."""
    full = [p for p in parts if p.shape[2]]
    return full[0] if len(full) == 1 else torch.cat(parts, dim=2)


def _heads(x: torch.Tensor, norm: Optional[nn.Module], head_dim: int) -> torch.Tensor:
    """(B, L, H * D) projections -> (B, L, H, D), through the attention's query/key norm where it has one: per head
    (Qwen3: the norm's weight has D entries) or over the whole projection before the split (OLMo 2: H * D)."""
    B, L, _ = x.shape
    weight = getattr(norm, "weight", None)
    if norm is not None and weight is not None and weight.numel() != head_dim and weight.numel() == x.shape[-1]:
        return norm(x).view(B, L, -1, head_dim)
    x = x.view(B, L, -1, head_dim)
    return norm(x) if norm is not None else x


def _linear_copy(base: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A trainable `nn.Linear` equal to ``base`` (a Linear or a bitsandbytes 4/8-bit Linear, dequantized)."""
    weight = base.weight
    if weight.__class__.__name__ == "Params4bit":
        import bitsandbytes as bnb

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes >= 0.49 repacks 4-bit weights in place for its CPU kernel (eval, no grad, AVX512-BF16
            # CPUs) into a layout dequantize_4bit does not read: undo the packing on a copy of the state
            import copy

            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        weight = bnb.functional.dequantize_4bit(data, state)
    elif weight.__class__.__name__ == "Int8Params":
        import bitsandbytes as bnb

        weight = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB) if weight.SCB is not None else weight
    dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
    out_features, in_features = weight.shape
    copy = nn.Linear(in_features, out_features, bias=base.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        copy.weight.copy_(weight.to(dtype))
        if base.bias is not None:
            copy.bias.copy_(base.bias.to(dtype))
    return copy


class LowRankDelta(nn.Module):
    """A beacon projection as the frozen base projection plus ``B @ A`` (``B`` starts at zero)."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        weight = base.weight
        out_features = getattr(base, "out_features", None) or weight.shape[0]
        in_features = getattr(base, "in_features", None) or weight.shape[1]
        self.A = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=torch.float32)
        self.B = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.A.weight, a=5**0.5)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x.to(self.A.weight.dtype)))


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention with an additive mask; softmax in fp32 (as transformers' eager path)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # (B, Hq, K, D)
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, Hq, L, K)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (B, L, Hq, D)


def split_causal_attention(query, mem_key, mem_value, key, value, scaling: float) -> torch.Tensor:
    """Inference fast path on CPU for a plain step (no padding, full-coverage): attend to the memory without a
    mask and to the chunk with the kernel's own causal mask, then merge the two softmaxes by their log-sum-exp.

    Equal to masked attention over ``[memory ; chunk]``, but it skips the chunk's upper triangle, never builds a
    mask and never copies the memory: for the memory part the query heads sharing a K/V head are folded into
    the query length instead of repeating K/V (grouped-query attention).
    query (B, Hq, L, D); mem_key/mem_value (B, Hkv, M, D); key/value (B, Hkv, L, D) -> (B, L, Hq, D).
    """
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    groups = Hq // Hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out, lse = flash(query, key, value, 0.0, True, scale=scaling)[:2]  # (B, Hq, L, D), (B, Hq, L)
    if mem_key.shape[2]:
        folded = query.reshape(B, Hkv, groups * L, D)  # head h = kv head h // groups: a pure view
        out_mem, lse_mem = flash(folded, mem_key, mem_value, 0.0, False, scale=scaling)[:2]
        out_mem, lse_mem = out_mem.reshape(B, Hq, L, D), lse_mem.reshape(B, Hq, L)
        total = torch.logaddexp(lse, lse_mem)  # (B, Hq, L) float32 whatever the inputs' dtype
        merged = out.float() * (lse - total).exp()[..., None] + out_mem.float() * (lse_mem - total).exp()[..., None]
        out = merged.to(query.dtype)  # half-precision inputs give half-precision outputs
    return out.transpose(1, 2)


class BeaconAttention(nn.Module, BaseTunerLayer):
    """Wraps one attention module; beacon projections live in ``beacon_{q,k,v,o}[adapter_name]``."""

    adapter_layer_names = ("beacon_q", "beacon_k", "beacon_v", "beacon_o")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BeaconConfig, with_projections: bool,
                 last_layer: bool = False):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
            if not hasattr(base_layer, name):
                raise TypeError(
                    f"{type(base_layer).__name__} has no `{name}`: beacon attention wraps Llama-family attention "
                    "modules (q_proj, k_proj, v_proj, o_proj, head_dim)"
                )
        self.base_layer = base_layer
        self.beacon_q = nn.ModuleDict()
        self.beacon_k = nn.ModuleDict()
        self.beacon_v = nn.ModuleDict()
        self.beacon_o = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.frozen_peft_weight_names = {}
        self.last_layer = last_layer
        self.update_layer(adapter_name, config, with_projections)

    @property
    def layer_idx(self) -> int:
        return self.base_layer.layer_idx

    def update_layer(self, adapter_name: str, config: BeaconConfig, with_projections: bool) -> None:
        if with_projections:
            quantized = self.base_layer.q_proj.weight.__class__.__name__ in ("Params4bit", "Int8Params")
            for p in config.beacon_projections:
                base = getattr(self.base_layer, f"{p}_proj")
                if config.beacon_rank is not None:
                    module = LowRankDelta(base, config.beacon_rank)
                else:
                    module = _linear_copy(base, torch.float32 if quantized else None)
                getattr(self, f"beacon_{p}")[adapter_name] = module
            if self.last_layer:
                # in the last layer a beacon's query and output only shape its own final hidden state, which
                # nothing reads (its K/V come from the layer's input): kept for checkpoint compatibility, frozen
                self.frozen_peft_weight_names[adapter_name] = ("beacon_q", "beacon_o")
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("Beacon projections act on beacon tokens only; they cannot be merged into the base.")

    def unmerge(self) -> None:
        raise NotImplementedError("Beacon adapters are never merged into the base (merging is not supported), so there "
                                  "is nothing to unmerge.")

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        ctx: Optional[ChunkContext] = kwargs.pop("beacon_ctx", None)
        if ctx is None or self.disable_adapters:
            return self.base_layer(hidden_states, **kwargs)
        return self._beacon_forward(hidden_states, kwargs["position_embeddings"], ctx)

    # --- the beacon path --------------------------------------------------------------------------------------
    def _project(self, name: str, x: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """Base projection for raw tokens, beacon projection for beacon tokens. x: (B, L, in) -> (B, L, out)."""
        base = getattr(self.base_layer, f"{name}_proj")
        beacon = getattr(self, f"beacon_{name}")
        rows = ctx.plan.inputs.beacon_flat  # (n_beacons,) flat index of the beacon entries, None if none
        if rows is None or ctx.adapter not in beacon:
            return base(x)
        beacon = beacon[ctx.adapter]
        B, L, _ = x.shape
        # the base projection over every entry (beacons are ~1/r of them), then the beacon rows overwritten:
        # cheaper than splitting the rows; the base projection's backward needs its input, not this output
        out = base(x).reshape(B * L, -1)
        beacon_in = x.reshape(B * L, -1).index_select(0, rows)
        if isinstance(beacon, LowRankDelta):  # beacon rows: base projection (already computed) + delta
            delta = beacon(beacon_in).to(out.dtype)
            if torch.is_grad_enabled():
                return out.index_add(0, rows, delta).view(B, L, -1)
            return out.index_add_(0, rows, delta).view(B, L, -1)
        beacon_out = beacon(beacon_in.to(beacon.weight.dtype)).to(out.dtype)
        if torch.is_grad_enabled():  # out-of-place: outputs of custom autograd Functions (bnb) cannot be modified
            return out.index_copy(0, rows, beacon_out).view(B, L, -1)
        return out.index_copy_(0, rows, beacon_out).view(B, L, -1)

    def _beacon_forward(self, x: torch.Tensor, position_embeddings, ctx: ChunkContext):
        attn = self.base_layer
        B, L, _ = x.shape
        D = attn.head_dim
        q = _heads(self._project("q", x, ctx), getattr(attn, "q_norm", None), D)  # (B, L, Hq, D)
        k = _heads(self._project("k", x, ctx), getattr(attn, "k_norm", None), D)  # (B, L, Hkv, D)
        v = self._project("v", x, ctx).view(B, L, -1, D).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, Hq, L, D), (B, Hkv, L, D) before RoPE
        cos, sin = position_embeddings  # (B, L, D)
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mem = ctx.layers[self.layer_idx] or LayerMemory.empty_like(k, v)
        S = mem.sink_k.shape[2]
        mem_cos, mem_sin = ctx.mem_rope
        # empty parts (no sink; no raw cache when a step starts at a window's start) cost no kernels
        mem_k = _cat_nonempty((
            apply_rope(mem.sink_k, mem_cos[:, :S], mem_sin[:, :S]) if S else mem.sink_k,
            mem.comp_k,
            apply_rope(mem.raw_k, mem_cos[:, S:], mem_sin[:, S:]) if mem.raw_k.shape[2] else mem.raw_k,
        ))  # (B, Hkv, S + C + R, D) after RoPE
        mem_v = _cat_nonempty((mem.sink_v, mem.comp_v, mem.raw_v))

        out = self._attend(q_rot, mem_k, mem_v, k_rot, v, ctx)  # (B, L, Hq, D)
        out = self._project("o", out.reshape(B, L, -1), ctx)
        ctx.new_layers[self.layer_idx] = ctx.plan.update.apply(mem, k, v, ctx.comp_rope)  # memory.MemoryUpdate
        return out, None

    def _attend(self, q, mem_k, mem_v, k, v, ctx: ChunkContext) -> torch.Tensor:
        """q (B, Hq, L, D) after RoPE; memory and chunk keys/values (B, Hkv, M or L, D) -> (B, L, Hq, D)."""
        attn = self.base_layer
        impl = attn.config._attn_implementation
        dropout = attn.attention_dropout if self.training else 0.0
        fast = impl == "sdpa" and ctx.plan.mask.plain and q.device.type == "cpu" and not torch.is_grad_enabled()
        if fast and dropout == 0.0:
            return split_causal_attention(q, mem_k, mem_v, k, v, attn.scaling)
        keys, values = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)  # (B, Hkv, M + L, D)
        if impl.startswith("flash") and ctx.plan.mask.plain:  # flash kernels align the causal mask bottom-right
            fn = ALL_ATTENTION_FUNCTIONS[impl]
            return fn(attn, q, keys, values, None, dropout=dropout, scaling=attn.scaling, is_causal=True)[0]
        if impl == "eager" or impl.startswith("flash") or impl not in ALL_ATTENTION_FUNCTIONS:
            return eager_attention(attn, q, keys, values, ctx.mask, attn.scaling, dropout)[0]
        fn = ALL_ATTENTION_FUNCTIONS[impl]
        return fn(attn, q, keys, values, ctx.mask, dropout=dropout, scaling=attn.scaling, is_causal=False)[0]
