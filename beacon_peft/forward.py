"""The progressive-compression loop that replaces the decoder's forward while a beacon adapter is active.

``generate`` and ``PeftModel.forward`` both end up in the causal LM's own ``forward``, which calls its decoder
(``model.model``). The tuner (`model.BeaconModel`) replaces that decoder's ``forward`` on the instance; on every
call it resolves the active adapter into an `ActiveBeacon` and hands it to `beacon_decoder_forward` (or, with
the adapter disabled, calls `base_decoder_forward`). The loop cuts the input into window-bounded steps
(`schedule.Scheduler`), groups consecutive steps up to ``group_tokens`` input tokens (`group.GroupPlan`), embeds
raw tokens with the base embedding and beacon slots with the beacon embedding, and runs the *unchanged* decoder
stack once per group, layer by layer over the group's concatenation (the wrapped attention layers run the steps'
attentions and memory updates in window order, reading the memory from ``beacon_ctx``; docs/semantics.md says why
this equals one pass per window). It returns the raw tokens' hidden states in input order with the memory as its
cache. The causal LM then applies ``lm_head`` and its usual shifted loss, which is exactly the compression-based
autoregressive loss of the paper.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .compat import cache_kwarg, model_output, take_cache
from .config import BeaconConfig
from .group import GroupContext, GroupPlan
from .labels import IGNORE_INDEX
from .layer import min_run_for
from .memory import BeaconMemory, memory_signature
from .rope import DecoderRope
from .schedule import RatioPicker, Scheduler

PROGRESS_MIN_STEPS = 16  # show a progress bar for calls with at least this many windows


@dataclass(frozen=True)
class ActiveBeacon:
    """What the window loop needs of the active adapter, resolved by the tuner for each call."""

    name: str
    config: BeaconConfig
    picker: RatioPicker  # chooses each window's compression ratio
    embedding: torch.Tensor  # (1, H) the beacon embedding
    rope: DecoderRope  # the decoder's rotary embedding with each layer's table and convention


def _columns(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[np.ndarray]:
    """Input columns of each row's real tokens (padding skipped), on the host."""
    if attention_mask is None:
        return [np.arange(length)] * batch
    mask = attention_mask[:, -length:].detach().to("cpu", torch.bool).numpy()
    return [np.flatnonzero(row) for row in mask]


def _ensure_non_reentrant_checkpointing(decoder: torch.nn.Module) -> None:
    """Memory tensors cross checkpointed layers as side outputs; only non-reentrant checkpointing keeps their
    gradient path, so a reentrant setting is switched (once, with a warning)."""
    for module in decoder.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and isinstance(fn, partial):
            if fn.keywords.get("use_reentrant", False):
                warnings.warn("beacon_peft: switching gradient checkpointing to use_reentrant=False (memory "
                              "gradients need it)", stacklevel=3)
                module._gradient_checkpointing_func = partial(fn.func, **{**fn.keywords, "use_reentrant": False})


def _check_inputs(decoder, input_ids, inputs_embeds, attention_mask, kwargs) -> tuple[int, int]:
    """Every check of a call's inputs, before any work: returns (batch, length)."""
    batch, length = _check_shapes(input_ids, inputs_embeds, attention_mask, kwargs)
    _check_kwargs(kwargs)
    if input_ids is not None:
        _check_vocabulary(input_ids, decoder.get_input_embeddings())
    else:
        _check_embeds(inputs_embeds, decoder.config.hidden_size)
    return batch, length


def _check_shapes(input_ids, inputs_embeds, attention_mask, kwargs) -> tuple[int, int]:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    x = input_ids if input_ids is not None else inputs_embeds
    expected = 2 if input_ids is not None else 3
    if x.dim() != expected:
        raise ValueError(f"{'input_ids' if input_ids is not None else 'inputs_embeds'} must have {expected} "
                         f"dims (batch, length{', hidden' if expected == 3 else ''}), got shape {tuple(x.shape)}")
    batch, length = x.shape[:2]
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a (batch, length) tensor of 1s and 0s, got a "
                        f"{type(attention_mask).__name__} (a multimodal wrapper such as Gemma3ForConditionalGeneration "
                        f"hands its language model a dict of masks per layer type): load the text model alone "
                        f"(AutoModelForCausalLM of a text-only checkpoint, e.g. Gemma3ForCausalLM)")
    if length == 0:
        raise ValueError("the input has length 0: pass at least one token (generate() with a memory slices input_ids "
                         "by the memory's length: pass the new tokens with an attention_mask covering memory + new "
                         "tokens, as beacon_peft.reuse.ask does)")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise ValueError(f"attention_mask must be 2-D (batch={batch}, >= {length} columns) with 1 for tokens "
                             f"and 0 for padding, got shape {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool:
            odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)]  # values that are neither
            if odd.numel():
                raise ValueError(f"attention_mask holds {odd[0].item()!r}: allowed 1 (a token) or 0 (padding)")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported with an active beacon adapter (a raw token attends "
                         "to the memory's beacons, not to the earlier tokens, so there is no full attention map); "
                         "output_hidden_states=True is")
    if kwargs.get("output_router_logits"):
        raise ValueError("output_router_logits=True is not supported with an active beacon adapter (no load-balancing "
                         "loss is computed over compressed windows): pass output_router_logits=False (or set the "
                         "model config's output_router_logits=False)")
    if not isinstance(kwargs.get("output_hidden_states", False), (bool, type(None))):
        raise TypeError(f"output_hidden_states must be True, False or None, got {kwargs['output_hidden_states']!r}")
    return batch, length


# Keywords a causal LM, the Trainer or generate() may hand the decoder that the loop accepts: the loss normaliser
# is the causal LM's business, output_attentions may only be False/None (`_check_shapes`) and output_hidden_states
# is honoured (`beacon_decoder_forward`). Anything else is refused.
_IGNORED_KWARGS = ("num_items_in_batch", "return_dict", "output_attentions", "output_hidden_states",
                   "output_router_logits", "is_causal")
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _check_kwargs(kwargs: dict) -> None:
    """Refuse keywords the compression loop would otherwise drop silently."""
    packed = [k for k in _PACKED_KWARGS if kwargs.get(k) is not None]
    if packed:
        raise ValueError(f"{packed} describe padding-free packed sequences, which window-by-window compression "
                         "cannot read: pad the batch instead (attention_mask with 0 for padding)")
    unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS and k not in _PACKED_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} for a model with an active beacon adapter; "
                        f"it takes input_ids or inputs_embeds, attention_mask, position_ids (ignored: positions are "
                        f"re-based onto the memory), use_cache, a cache/past_key_values, and {list(_IGNORED_KWARGS)}")


def _check_vocabulary(input_ids: torch.Tensor, embed: torch.nn.Module) -> None:
    """Token ids must be integers inside the embedding's vocabulary (checked before any work)."""
    _require_integer("input_ids", input_ids)
    vocab = embed.num_embeddings if hasattr(embed, "num_embeddings") else embed.weight.shape[0]
    bad = _outside_vocabulary(input_ids, vocab)
    if bad is not None:
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary: allowed [0, {vocab - 1}]")


def check_labels(labels, batch: int, length: int, vocab: int) -> None:
    """``labels`` of a call over ``batch`` rows of ``length`` new tokens: an integer tensor of that shape holding
    token ids in ``[0, vocab)`` or `IGNORE_INDEX`; else a TypeError/ValueError naming what is wrong, raised before
    any window is read (the loss would otherwise fail, or mean something else, after the whole forward)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of token ids (batch, length), got {type(labels).__name__}")
    _require_integer("labels", labels)
    if tuple(labels.shape) != (batch, length):
        raise ValueError(f"labels must have the input's shape (batch={batch}, length={length}), got shape "
                         f"{tuple(labels.shape)}")
    bad = _outside_vocabulary(labels, vocab, exempt=IGNORE_INDEX)
    if bad is not None:
        raise ValueError(f"labels hold {bad}: allowed token ids in [0, {vocab - 1}] or {IGNORE_INDEX} (ignored)")


def _require_integer(name: str, ids: torch.Tensor) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}")


def _outside_vocabulary(ids: torch.Tensor, vocab: int, exempt: int | None = None) -> int | None:
    """The id to report when ``ids`` (``exempt`` aside) leave ``[0, vocab)``: the lowest if one is negative, else the
    highest; None when all are inside. Two kernels (min and max in one) and one host sync."""
    if exempt is not None:
        ids = ids.masked_fill(ids == exempt, 0)  # an exempt position reads as id 0, inside any vocabulary
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0:
        return low
    return high if high >= vocab else None


def _check_embeds(inputs_embeds: torch.Tensor, hidden: int) -> None:
    if not inputs_embeds.dtype.is_floating_point:
        raise TypeError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}")
    if inputs_embeds.shape[-1] != hidden:
        raise ValueError(f"inputs_embeds has hidden size {inputs_embeds.shape[-1]} but the model's is {hidden}: "
                         f"pass shape (batch, length, {hidden})")


def _resolve_memory(cache, batch: int, signature: dict) -> BeaconMemory | None:
    """The memory to continue from, or None for a fresh sequence (no cache, or generate()'s empty one)."""
    if cache is None:
        return None
    if isinstance(cache, BeaconMemory):
        if cache.batch_size != batch:
            hint = ("; generate() with num_beams or num_return_sequences > 1 repeats the input's rows but not a "
                    "memory's: use beacon_peft.reuse.ask, or pass a copy expanded with batch_repeat_interleave"
                    if batch > cache.batch_size and batch % cache.batch_size == 0 else "")
            raise ValueError(f"the memory holds {cache.batch_size} rows but the input has {batch}{hint}")
        differs = {k: (cache.signature.get(k), v) for k, v in signature.items()
                   if cache.signature and cache.signature.get(k) != v}
        if differs:
            shown = ", ".join(f"{k}: memory {a!r} vs model {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"this BeaconMemory was made by another model or adapter setting ({shown})")
        return cache
    if isinstance(cache, Cache):
        if cache.get_seq_length() == 0:
            return None  # generate() hands an empty cache of its own to a fresh sequence
        raise ValueError(f"the cache must be a BeaconMemory from an earlier call (or None), got "
                         f"{type(cache).__name__} holding {cache.get_seq_length()} tokens")
    check_cache_type(cache)


def check_cache_type(cache) -> None:
    """A TypeError unless ``cache`` is None, a `BeaconMemory` or a transformers ``Cache`` (generate() hands an empty
    one to a fresh sequence; `_resolve_memory` refuses one holding tokens)."""
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"the cache must be a BeaconMemory from an earlier call (or None), got {type(cache).__name__}"
                        + (" (legacy tuple caches are not supported)" if isinstance(cache, (tuple, list)) else ""))


def base_decoder_forward(original_forward: Callable, decoder: torch.nn.Module, *args,
                         **kwargs) -> BaseModelOutputWithPast:
    """The adapter is disabled: exactly the base decoder (a beacon memory cannot be continued by it)."""
    cache = take_cache(kwargs)
    if isinstance(cache, BeaconMemory):
        raise ValueError("a BeaconMemory was passed while the beacon adapter is disabled")
    return original_forward(*args, **{cache_kwarg(decoder): cache}, **kwargs)


def beacon_decoder_forward(
    active: ActiveBeacon,
    original_forward: Callable,
    decoder: torch.nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs,
) -> tuple[BaseModelOutputWithPast, list[int]]:
    """Progressive compression of one call: the decoder's output (raw tokens' hidden states in input order, the
    memory as its cache) and the compression ratio of every window step of the call. ``position_ids`` are
    ignored: positions are re-based onto the memory."""
    cache = take_cache(kwargs)  # `cache=` (transformers >= 5.24) or `past_key_values=` (earlier), never dropped
    batch, length = _check_inputs(decoder, input_ids, inputs_embeds, attention_mask, kwargs)
    kwargs.pop("output_attentions", None)
    want_hidden = kwargs.pop("output_hidden_states", None)
    if want_hidden is None:  # the decoder's own default (config.output_hidden_states), as the base would read it
        want_hidden = bool(getattr(decoder.config, "output_hidden_states", False))
    device = (input_ids if input_ids is not None else inputs_embeds).device
    signature = memory_signature(decoder, active.config)
    memory = _resolve_memory(cache, batch, signature)
    if memory is None:  # a fresh sequence
        memory = BeaconMemory(decoder.config.num_hidden_layers, batch, active.rope, device, signature=signature)
    if decoder.training and torch.is_grad_enabled():
        _ensure_non_reentrant_checkpointing(decoder)

    state = memory.state.copy()  # committed only if the whole call succeeds
    steps_before = len(state.ratio_log)
    cols = _columns(attention_mask, batch, length)
    if not any(len(c) for c in cols):
        raise ValueError("attention_mask marks every position as padding: there is no token to read")
    scheduler = Scheduler(active.config, state, cols, length, decoder.training, active.picker, device)
    decoder_kwargs = {**kwargs, cache_kwarg(decoder): None, "output_hidden_states": want_hidden}  # memory: in ctx
    run = partial(_run_group, active, original_forward, decoder, input_ids, inputs_embeds, decoder_kwargs)
    pieces, destinations, group_layers = [], [], []  # group_layers[i][k]: group i's raw rows of hidden_states[k]
    longest = max(len(c) for c in cols)
    with tqdm(total=longest, unit="tok", desc="beacon prefill", leave=False,
              disable=True if math.ceil(longest / active.config.stride) + 1 < PROGRESS_MIN_STEPS else None) as bar:
        min_run = min_run_for(device)
        for plans in _groups(scheduler, pass_budget(active.config, decoder.rotary_emb, device)):
            group = GroupPlan(plans, device, min_run)
            state.layers, hidden, per_layer = run(group, state.layers)  # hidden (B, T, H)
            pieces.append(hidden.reshape(-1, hidden.shape[-1]).index_select(0, group.out_src))
            destinations.append(group.out_dst)
            if per_layer is not None:  # the raw entries of each layer's (B, T, H)
                group_layers.append([h.reshape(-1, h.shape[-1]).index_select(0, group.out_src) for h in per_layer])
            bar.update(sum(p.host.tokens for p in plans))

    dst = destinations[0] if len(destinations) == 1 else torch.cat(destinations)
    hidden = _connected(_in_input_order(pieces, dst, batch, length), active.embedding)
    all_hidden = tuple(_in_input_order(list(layer), dst, batch, length) for layer in zip(*group_layers)) \
        if want_hidden else None
    state.columns += length
    memory.state = state
    output = model_output(hidden, memory if use_cache is not False else None, hidden_states=all_hidden,
                          moe=hasattr(decoder.config, "output_router_logits"))
    return output, state.ratio_log[steps_before:]


def rope_depends_on_length(rotary: torch.nn.Module) -> bool:
    """Whether ``rotary`` recomputes its frequencies from the largest position of each call (transformers'
    ``dynamic_rope_update``: dynamic NTK scaling, longrope's short/long factors), so that a key's rotation depends
    on what else the call holds, not on its position alone."""
    rope_type = getattr(rotary, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any("dynamic" in str(t) or t == "longrope" for t in types)


def pass_budget(config: BeaconConfig, rotary: torch.nn.Module, device) -> int:
    """Input tokens per row of one decoder pass: `BeaconConfig.pass_tokens`, except for a rotary embedding whose
    tables depend on each call's largest position (`rope_depends_on_length`): there one pass holds one window
    step, so every window is rotated with the tables the window loop gave it (grouping would rotate all the
    windows of a pass with the pass's last position, and a CPU and a GPU, whose budgets differ, would disagree)."""
    return 1 if rope_depends_on_length(rotary) else config.pass_tokens(device)


def _groups(scheduler: Scheduler, budget: int):
    """The call's steps, cut into groups of consecutive steps that read at most ``budget`` raw tokens per row; a
    step over the budget forms a group of its own (so a budget up to one window is the window-by-window loop).
    Counting raw tokens, not beacons, makes the cuts depend on the input's length alone, never on the ratios drawn
    (processes that shard the layers must make the same number of decoder passes)."""
    pending = None
    while True:
        plans, size = [], 0
        while (plan := pending or scheduler.plan()) is not None:
            pending = None
            if plans and size + plan.host.tokens > budget:
                pending = plan
                break
            plans.append(plan)
            size += plan.host.tokens
        if not plans:
            return
        yield plans


def _connected(hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """``hidden`` unchanged in value, but part of the graph whenever gradients are on and the beacon embedding is
    trainable. A call that makes no beacon (input shorter than one window) touches no trainable parameter, so over a
    frozen base its loss would have no ``grad_fn`` and ``backward()`` would fail (a Trainer's last short batch):
    adding ``0 * embedding`` gives it one, as any adapter's loss has on a batch it does not change (the adapter's
    parameters then get zero or no gradients)."""
    if hidden.requires_grad or not embedding.requires_grad or not torch.is_grad_enabled():
        return hidden
    return hidden + embedding.sum().mul(0).to(hidden.dtype)


def _in_input_order(pieces: list[torch.Tensor], destinations: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The raw tokens' rows gathered step by step (each (n_step, H)) put back at their input columns: (B, T, H);
    padding columns stay zero."""
    source = torch.cat(pieces)  # (n_raw, H)
    out = source.new_zeros(batch * length, source.shape[-1]).index_copy(0, destinations, source)
    return out.view(batch, length, -1)


def _run_group(active: ActiveBeacon, original_forward: Callable, decoder: torch.nn.Module, input_ids, inputs_embeds,
               decoder_kwargs: dict, group: GroupPlan, layers: list) -> tuple[list, torch.Tensor, tuple | None]:
    """One group of steps through the unchanged decoder stack, as one sequence: the layers' memory after the group,
    the last hidden states (B, T, H) of the group's entries and, when ``output_hidden_states`` is asked, the
    decoder's tuple of every layer's (B, T, H) (else None)."""
    if input_ids is not None:
        embeds = decoder.get_input_embeddings()(input_ids.gather(1, group.input_cols))  # (B, T, H)
    else:
        index = group.input_cols[:, :, None].expand(-1, -1, inputs_embeds.shape[-1])
        embeds = inputs_embeds.gather(1, index)
    if group.has_beacons:
        embeds = torch.where(group.is_beacon[..., None], active.embedding.to(embeds.dtype), embeds)
    rope = _rope_tables(active.rope, embeds, group)
    num_layers = decoder.config.num_hidden_layers
    ctx = GroupContext(active.name, active.config, embeds.dtype, group, list(layers), rope, [None] * num_layers)
    # a ready 4-D mask makes the decoder build none: the beacon attention reads the group's own masks, and an
    # (T x T) causal mask over a long group would cost O(T^2) memory for nothing
    out = original_forward(inputs_embeds=embeds, position_ids=group.position_ids, attention_mask=_NO_MASK,
                           use_cache=False, beacon_ctx=ctx, **decoder_kwargs)
    if any(layer is None for layer in ctx.new_layers):
        missing = [i for i, layer in enumerate(ctx.new_layers) if layer is None]
        raise RuntimeError(f"decoder layers {missing} bypassed the beacon attention (not wrapped?)")
    return ctx.new_layers, out.last_hidden_state, out.hidden_states if decoder_kwargs["output_hidden_states"] else None


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a placeholder 4-D mask nobody reads


def _rope_tables(rope: DecoderRope, embeds: torch.Tensor, group: GroupPlan) -> dict:
    """Per rotary table the layers read (one, or one per layer type: Gemma 3, OLMo 3), per segment the (cos, sin)
    tables (B, *, D) of its memory parts and of its compressed entries (one rotary call per table for the group)."""
    if group.rope_positions is None:
        return {t: [(None, None) for _ in group.segments] for t in rope.tables}
    return {t: [tuple(None if s is None else (cos[:, s], sin[:, s]) for s in pair) for pair in group.rope_slices]
            for t, (cos, sin) in rope.at(embeds, group.rope_positions).items()}
