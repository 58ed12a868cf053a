"""`BeaconAttention`: the tuner layer PEFT wraps around every decoder attention module.

One class serves every Llama-family attention (Llama, Mistral, Qwen2, Qwen3, ...): it reads the wrapped
module's ``q/k/v/o_proj``, optional ``q_norm``/``k_norm``, ``head_dim`` and ``scaling``, so no modeling file
is forked. Raw tokens use the frozen base projections, beacon tokens use the adapter's beacon projections
(copies of the base ones, dequantized when the base is 4-bit). Attention runs over
``[sink ; compressed beacons ; raw cache ; chunk]`` with the step's mask through transformers' attention
functions (eager / sdpa, flash-attention for plain causal steps: that path has never run here, no GPU with
flash-attn was available), and the layer hands back its next memory.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .config import BeaconConfig
from .group import GroupContext, Run
from .masks import build_mask
from .memory import LayerMemory, select_entries
from .rope import apply_rope, as_dtype


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
    # how a run of windows attends: "auto" = `_split_windows` for inference on the CPU (exact work, no mask; the CPU
    # is not bound by launches), else one masked call (fewest launches; gradients); "split" / "masked" force one
    # (benchmarks/efficiency/launches.py counts what an accelerator runs with "masked")
    windows_path: str = "auto"

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
        ctx: Optional[GroupContext] = kwargs.pop("beacon_ctx", None)
        if ctx is None or self.disable_adapters:
            return self.base_layer(hidden_states, **kwargs)
        return self._beacon_forward(hidden_states, kwargs["position_embeddings"], ctx)

    # --- the beacon path --------------------------------------------------------------------------------------
    def _project(self, name: str, x: torch.Tensor, ctx: GroupContext,
                 beacon_in: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Base projection for raw tokens, beacon projection for beacon tokens. x: (B, T, in) -> (B, T, out);
        ``beacon_in`` (n_beacons, in): the beacon rows of x when the caller already gathered them."""
        base = getattr(self.base_layer, f"{name}_proj")
        beacon = getattr(self, f"beacon_{name}")
        rows = ctx.group.beacon_flat  # (n_beacons,) flat index of the beacon entries, None if none
        if rows is None or ctx.adapter not in beacon:
            return base(x)
        beacon = beacon[ctx.adapter]
        B, T, _ = x.shape
        # the base projection over every entry (beacons are ~1/r of them), then the beacon rows overwritten:
        # cheaper than splitting the rows; the base projection's backward needs its input, not this output
        out = base(x).reshape(B * T, -1)
        if beacon_in is None:
            beacon_in = x.reshape(B * T, -1).index_select(0, rows)
        if isinstance(beacon, LowRankDelta):  # beacon rows: base projection (already computed) + delta
            delta = as_dtype(beacon(beacon_in), out.dtype)
            if torch.is_grad_enabled():
                return out.index_add(0, rows, delta).view(B, T, -1)
            return out.index_add_(0, rows, delta).view(B, T, -1)
        beacon_out = as_dtype(beacon(as_dtype(beacon_in, beacon.weight.dtype)), out.dtype)
        if torch.is_grad_enabled():  # out-of-place: outputs of custom autograd Functions (bnb) cannot be modified
            return out.index_copy(0, rows, beacon_out).view(B, T, -1)
        return out.index_copy_(0, rows, beacon_out).view(B, T, -1)

    def _beacon_forward(self, x: torch.Tensor, position_embeddings, ctx: GroupContext):
        """One decoder layer's attention for a whole group of steps. x: (B, T, H) the group's concatenation."""
        attn = self.base_layer
        B, T, _ = x.shape
        D = attn.head_dim
        rows = ctx.group.beacon_flat
        beacon_in = None if rows is None else x.reshape(B * T, -1).index_select(0, rows)  # (n_beacons, H)
        q = _heads(self._project("q", x, ctx, beacon_in), getattr(attn, "q_norm", None), D)  # (B, T, Hq, D)
        k = _heads(self._project("k", x, ctx, beacon_in), getattr(attn, "k_norm", None), D)  # (B, T, Hkv, D)
        v = self._project("v", x, ctx, beacon_in).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        Hq = q.shape[2]
        qk = torch.cat((q, k), dim=2).transpose(1, 2)  # (B, Hq + Hkv, T, D) before RoPE: rotated in one go
        k = qk[:, Hq:]  # (B, Hkv, T, D) before RoPE
        cos, sin = position_embeddings  # (B, T, D)
        qk_rot = apply_rope(qk, cos, sin)
        q_rot, k_rot = qk_rot[:, :Hq], qk_rot[:, Hq:]  # (B, Hq, T, D), (B, Hkv, T, D)

        mem = ctx.layers[self.layer_idx] or LayerMemory.empty_like(k, v)
        outs = []
        whole = len(ctx.group.segments) == 1
        for seg, tables in zip(ctx.group.segments, ctx.rope):
            part = slice(seg.start, seg.start + seg.length)
            step = (q_rot, k, k_rot, v) if whole else (q_rot[:, :, part], k[:, :, part], k_rot[:, :, part],
                                                        v[:, :, part])
            if seg.run is not None:
                out, mem = self._run_attention(*step, mem, seg.run, tables, ctx)
            else:
                out, mem = self._step_attention(*step, mem, seg.step, tables, ctx)
            outs.append(out)  # (B, n, Hq, D)
        out = outs[0] if whole else torch.cat(outs, dim=1)  # (B, T, Hq, D)
        out = self._project("o", out.reshape(B, T, -1), ctx)
        ctx.new_layers[self.layer_idx] = mem
        return out, None

    def _step_attention(self, q, k, k_rot, v, mem: LayerMemory, index: int, tables, ctx: GroupContext):
        """One step of the group, any mode: attention over ``[memory ; chunk]`` with the step's mask, then the
        step's `MemoryUpdate`. q (B, Hq, L, D) after RoPE; k before and k_rot after RoPE, v (B, Hkv, L, D).
        Returns the output (B, L, Hq, D) and the memory after the step."""
        plan = ctx.group.plans[index]
        mem_tables, comp_tables = tables
        S, R = mem.sink_k.shape[2], mem.raw_k.shape[2]
        # empty parts (no sink; no raw cache when a step starts at a window's start) cost no kernels
        mem_k = _cat_nonempty((
            apply_rope(mem.sink_k, mem_tables[0][:, :S], mem_tables[1][:, :S]) if S else mem.sink_k,
            mem.comp_k,
            apply_rope(mem.raw_k, mem_tables[0][:, S:], mem_tables[1][:, S:]) if R else mem.raw_k,
        ))  # (B, Hkv, S + C + R, D) after RoPE
        mem_v = _cat_nonempty((mem.sink_v, mem.comp_v, mem.raw_v))
        out = self._attend(q, mem_k, mem_v, k_rot, v, plan,
                           lambda: ctx.cached(("mask", index), lambda: build_mask(plan.mask, ctx.config, ctx.dtype)))
        return out, plan.update.apply(mem, k, v, comp_tables)  # memory.MemoryUpdate

    def _attend(self, q, mem_k, mem_v, k, v, plan, mask) -> torch.Tensor:
        """q (B, Hq, L, D) after RoPE; memory and chunk keys/values (B, Hkv, M or L, D) -> (B, L, Hq, D).
        ``mask()`` gives the step's additive mask (B, 1, L, M + L)."""
        attn = self.base_layer
        impl = attn.config._attn_implementation
        dropout = attn.attention_dropout if self.training else 0.0
        plain = plan.host.plain
        if impl == "sdpa" and plain and q.device.type == "cpu" and not torch.is_grad_enabled() and dropout == 0.0:
            return split_causal_attention(q, mem_k, mem_v, k, v, attn.scaling)
        keys, values = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)  # (B, Hkv, M + L, D)
        if impl.startswith("flash") and plain:  # flash kernels align the causal mask bottom-right
            fn = ALL_ATTENTION_FUNCTIONS[impl]
            return fn(attn, q, keys, values, None, dropout=dropout, scaling=attn.scaling, is_causal=True)[0]
        if impl == "eager" or impl.startswith("flash") or impl not in ALL_ATTENTION_FUNCTIONS:
            return eager_attention(attn, q, keys, values, mask(), attn.scaling, dropout)[0]
        fn = ALL_ATTENTION_FUNCTIONS[impl]
        return fn(attn, q, keys, values, mask(), dropout=dropout, scaling=attn.scaling, is_causal=False)[0]

    # --- a run of appending windows -----------------------------------------------------------------------------
    def _run_attention(self, q, k, k_rot, v, mem: LayerMemory, run: Run, tables, ctx: GroupContext):
        """A run of G windows that each append to the compressed memory, as one batch of windows.

        Window i reads the memory before the run (sink, compressed) plus what windows 0..i-1 appended, and itself
        causally. The appended entries (beacons; raw tokens at ratio 0) are rotated once to the positions they
        keep, exactly as `MemoryUpdate` does window by window. q (B, Hq, n, D) after RoPE; k before and k_rot
        after RoPE, v (B, Hkv, n, D). Returns the output (B, n, Hq, D) and the memory after the run."""
        B, Hq, _, D = q.shape
        sink_tables, comp_tables = tables
        new_k = apply_rope(k.index_select(2, run.appended), *comp_tables)  # (B, Hkv, K, D) at kept positions
        new_v = v.index_select(2, run.appended)
        if run.shared:
            comp_k, comp_v = _cat_nonempty((mem.comp_k, new_k)), _cat_nonempty((mem.comp_v, new_v))
        else:  # each row's appends follow its own compressed entries (`group.Run.comp_index`)
            comp_k = select_entries(mem.comp_k, new_k, run.comp_index)  # (B, Hkv, C + K, D)
            comp_v = select_entries(mem.comp_v, new_v, run.comp_index)
        after = LayerMemory(mem.sink_k, mem.sink_v, comp_k, comp_v, mem.raw_k, mem.raw_v)
        S = mem.sink_k.shape[2]
        mem_k = _cat_nonempty((apply_rope(mem.sink_k, *sink_tables) if S else mem.sink_k, comp_k))  # (B, Hkv, M, D)
        mem_v = _cat_nonempty((mem.sink_v, comp_v))
        qw, kw, vw = (_windows(t, run) for t in (q, k_rot, v))  # (B * G, H, W, D)
        out = self._attend_windows(qw, kw, vw, mem_k, mem_v, run, ctx)  # (B * G, W, Hq, D)
        out = out.reshape(B, run.windows * run.width, Hq, D)
        return (out if run.unpad is None else out.index_select(1, run.unpad)), after

    def _attend_windows(self, q, k, v, mem_k, mem_v, run: Run, ctx: GroupContext) -> torch.Tensor:
        """Attention of a batch of windows: q (B * G, Hq, W, D), k/v (B * G, Hkv, W, D) the windows' own entries,
        mem_k/mem_v (B, Hkv, M, D) the memory after the run, of which window i of row b reads the first
        ``run.visible[b, i]`` entries. Returns (B * G, W, Hq, D)."""
        attn = self.base_layer
        impl = attn.config._attn_implementation
        dropout = attn.attention_dropout if self.training else 0.0
        B, M, G = mem_k.shape[0], mem_k.shape[2], run.windows
        cpu_inference = impl == "sdpa" and q.device.type == "cpu" and not torch.is_grad_enabled() and dropout == 0.0
        if self.windows_path == "split" or (self.windows_path == "auto" and cpu_inference):
            return _split_windows(q, k, v, mem_k, mem_v, run, attn.scaling)
        mk, mv = _per_window(mem_k, G), _per_window(mem_v, G)  # (B * G, Hkv, M, D)
        keys, values = torch.cat((mk, k), dim=2), torch.cat((mv, v), dim=2)  # (B * G, Hkv, M + W, D)
        mask = ctx.cached(("run-mask", run.start, q.dtype), lambda: _run_mask(run, B, M, q))  # (B*G, 1, W, M + W)
        if impl == "eager":
            return eager_attention(attn, q, keys, values, mask, attn.scaling, dropout)[0]
        groups = q.shape[1] // keys.shape[1]
        if groups > 1:  # every head its K/V: CUDA's memory-efficient kernel takes a float mask but not GQA
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout,
                                                         scale=attn.scaling)
        return out.transpose(1, 2)


def min_run_for(device: torch.device) -> Optional[int]:
    """The fewest appending steps a group runs as one batch of windows on ``device``, or None for none.

    Batches of windows serve inference and accelerators; with gradients on the CPU every window's attention is its
    own masked call, exactly the window loop's work (a batch's masked call computes the masked-out memory too, and
    the CPU, unlike an accelerator, pays for work rather than for launches)."""
    auto_cpu_training = BeaconAttention.windows_path == "auto" and device.type == "cpu" and torch.is_grad_enabled()
    return None if auto_cpu_training else 2


def _split_windows(q, k, v, mem_k, mem_v, run: Run, scaling: float) -> torch.Tensor:
    """A run's attention on the CPU without gradients, exactly the window loop's work: every window causally over
    itself (one batched flash call, nothing above the diagonal), then window i over its visible memory prefix
    (one call each, no mask; per row when the rows' prefixes differ), merged by log-sum-exp. Shapes as
    `_attend_windows`; returns (B * G, W, Hq, D)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q, k, v, 0.0, True, scale=scaling)[:2]  # (B * G, Hq, W, D), (B * G, Hq, W) float32
    G = run.windows
    own, own_lse, qs = out.unflatten(0, (-1, G)), lse.unflatten(0, (-1, G)), q.unflatten(0, (-1, G))  # (B, G, ...)
    rows = [slice(None)] if run.shared else [slice(b, b + 1) for b in range(own.shape[0])]
    merged = [_with_memory(qs[r], own[r], own_lse[r], mem_k[r], mem_v[r], run.visible[0 if run.shared else r.start],
                           scaling) for r in rows]
    merged = merged[0] if len(merged) == 1 else torch.cat(merged)  # (B, G, Hq, W, D)
    return merged.flatten(0, 1).transpose(1, 2)


def _with_memory(qs, own, own_lse, mem_k, mem_v, visible: np.ndarray, scaling: float) -> torch.Tensor:
    """Windows' own causal outputs ``own`` (B, G, Hq, W, D) (log-sum-exp ``own_lse`` (B, G, Hq, W)) merged with
    each window's attention over the first ``visible[i]`` memory entries (mem_k/mem_v (B, Hkv, M, D), queries
    ``qs`` (B, G, Hq, W, D)): the softmax over both, from two flash calls. Windows that read no memory keep ``own``."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    G = own.shape[1]
    first = int(np.argmax(visible > 0)) if visible.any() else G  # the windows before it read no memory
    if first >= G:
        return own
    parts = [flash(qs[:, i], mem_k[:, :, :n], mem_v[:, :, :n], 0.0, False, scale=scaling)[:2]
             for i, n in zip(range(first, G), visible[first:].tolist())]
    out_m = torch.stack([o for o, _ in parts], 1)  # (B, G - first, Hq, W, D)
    lse_m = torch.stack([lse_i for _, lse_i in parts], 1)  # (B, G - first, Hq, W)
    mine, mine_lse = (own[:, first:], own_lse[:, first:]) if first else (own, own_lse)
    weight = torch.sigmoid(mine_lse - lse_m)[..., None]  # the window's own share of the softmax mass
    merged = as_dtype(out_m + weight * (mine - out_m), qs.dtype)  # float32 arithmetic for half-precision inputs
    return torch.cat((own[:, :first], merged), dim=1) if first else merged


def _windows(x: torch.Tensor, run: Run) -> torch.Tensor:
    """A run's entries (B, H, n, D) as a batch of windows (B * G, H, W, D), padded windows repeating an entry
    (without padding and with one row, a view)."""
    if run.window_index is not None:
        x = x.index_select(2, run.window_index)  # (B, H, G * W, D)
    return x.unflatten(2, (run.windows, run.width)).transpose(1, 2).flatten(0, 1)


def _per_window(x: torch.Tensor, windows: int) -> torch.Tensor:
    """(B, H, M, D) -> (B * G, H, M, D), each row's tensor for each of its G windows (a view when B == 1)."""
    B = x.shape[0]
    if B == 1:
        return x.expand(windows, -1, -1, -1)
    return x.unsqueeze(1).expand(B, windows, *x.shape[1:]).reshape(B * windows, *x.shape[1:])


def _run_mask(run: Run, B: int, M: int, q: torch.Tensor) -> torch.Tensor:
    """Additive mask (B * G, 1, W, M + W) of a batch of windows: window i reads its visible memory and itself
    causally (a padded window's extra entries come last, so no real entry reads them)."""
    G, W = run.windows, run.width
    rows = 1 if run.shared else B  # every row reads the same prefixes, or each its own (`group.Run.visible`)
    visible = run.visible[:rows].reshape(-1)  # (rows * G,)
    vis = torch.from_numpy(np.arange(M)[None, :] < visible[:, None]).to(q.device)  # (rows * G, M): window reads j
    vis = vis[:, None, :].expand(rows * G, W, M)
    causal = torch.ones(W, W, dtype=torch.bool, device=q.device).tril()[None].expand(rows * G, W, W)
    allowed = torch.cat((vis, causal), dim=-1)  # (rows * G, W, M + W)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, torch.finfo(q.dtype).min)
    return (mask.repeat(B, 1, 1) if run.shared else mask)[:, None]
