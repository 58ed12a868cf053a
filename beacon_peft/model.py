"""`BeaconModel`: the PEFT tuner of Activation Beacon.

It wraps every decoder attention module in a `BeaconAttention`, owns the beacon embedding of each adapter
(``beacon_embedding[adapter]``, shape (1, hidden), initialised from the eos/bos embedding), and replaces the
decoder's ``forward`` on the instance with the progressive-compression loop (`forward.beacon_decoder_forward`),
so ``model(...)``, the Trainer and ``generate()`` all compress window by window. Disabling the adapter (or
unloading it) restores the base model exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .checkpoint import check_adapter_weights
from .compat import CACHE_NAMES
from .config import BeaconConfig
from .forward import ActiveBeacon, base_decoder_forward, beacon_decoder_forward, check_cache_type, check_labels
from .group import Sealing, open_context
from .labels import IGNORE_INDEX
from .layer import BeaconAttention
from .logs import beacon_call
from .rope import decoder_rope
from .schedule import RatioPicker, check_continuable_calls
from .support import check_architecture, decoder_of


def _decoder_forward(tuner: "BeaconModel", original, decoder: nn.Module, *args, **kwargs):
    """The decoder's ``forward`` while the tuner is attached: the base decoder when the adapter is disabled, else
    the window loop with the active adapter resolved (its ratios are recorded for `ratios_last_call`)."""
    active = tuner.active_beacon()
    if active is None:
        return base_decoder_forward(original, decoder, *args, **kwargs)
    if not decoder.training:
        active.picker.warn_random_inference()
    output, ratios = beacon_decoder_forward(active, Sealing(original), decoder, *args, **kwargs)
    tuner._last_ratios[active.name] = ratios
    return output


def _embed_token_id(decoder: nn.Module, config: BeaconConfig) -> int:
    """The token whose embedding the beacon embedding starts from (``embed_init``), checked against the vocabulary."""
    token_id = getattr(decoder.config, f"{config.embed_init}_token_id", None)
    if isinstance(token_id, (list, tuple)):
        token_id = token_id[0] if token_id else None
    other = "bos" if config.embed_init == "eos" else "eos"
    if token_id is None:
        raise ValueError(
            f"embed_init={config.embed_init!r} but the model config has no {config.embed_init}_token_id: "
            f"use embed_init={other!r} or set the token id"
        )
    vocab = decoder.get_input_embeddings().weight.shape[0]
    if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab:
        raise ValueError(
            f"embed_init={config.embed_init!r} reads {config.embed_init}_token_id={token_id!r} from the model "
            f"config, outside the embedding's vocabulary: allowed [0, {vocab - 1}] (fix the config's token id or use "
            f"embed_init={other!r})"
        )
    return token_id


class BeaconModel(BaseTuner):
    """Activation Beacon adapter (arXiv 2401.03462) over a transformers decoder-only causal LM.

    Example:
        ```py
        >>> import beacon_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, beacon_peft.BeaconConfig(window=1024, ratios=[8]))
        >>> out = model(input_ids=long_ids, labels=long_ids)  # compressed window by window
        >>> out.past_key_values.sizes()  # {'sink': 0, 'comp': ..., 'raw': ..., ...}
        ```
    """

    prefix: str = "beacon_"
    tuner_layer_cls = BeaconAttention
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # set before BaseTuner.__init__, which injects (and reaches `inject_adapter`) right away
        self.__dict__.update(_pickers={}, _last_ratios={}, _patched_decoder=None, _enabled=True, _rope=None,
                             _anatomies={})
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # --- injection ---------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: BeaconConfig, model_config: dict) -> BeaconConfig:
        return peft_config

    def _check_new_adapter_config(self, config: BeaconConfig) -> None:
        if not isinstance(config, BeaconConfig):
            raise TypeError(f"expected a BeaconConfig, got {type(config).__name__}")

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Wrap the attention modules, add the beacon embedding and patch the decoder: all or nothing.

        The config (and, for an adapter read from a local folder, its weights' names and shapes) is checked
        against the model first; any failure after that rolls every change back, so the base model is left
        exactly as it was.
        """
        config = self.peft_config[adapter_name]
        decoder = decoder_of(model)
        if "_beacon_original_forward" in decoder.__dict__ and self._patched_decoder is not decoder:
            raise ValueError("this model already carries a beacon adapter (get_peft_model was given a PEFT model, or "
                             "a model another BeaconModel patched): add a second adapter with add_adapter() or "
                             "load_adapter() on that PEFT model, or unload() it first")
        anatomies = check_architecture(model, decoder)
        _default_targets(decoder, config, anatomies)
        self._check_beacon_layers(decoder, config)
        _embed_token_id(decoder, config)
        source = config.__dict__.pop("_beacon_source", None)  # set by BeaconConfig.from_pretrained
        if source is not None:
            check_adapter_weights(source, model, decoder, config, adapter_name, self._remove_adapter_name_from_key)
        snapshot = self._snapshot(model)
        self._anatomies.update(anatomies)
        self.__dict__["_rope"] = None  # read again from the wrapped layers
        try:
            self._inject(model, decoder, adapter_name, config, **kwargs)
        except BaseException:
            self._rollback(model, adapter_name, snapshot)
            raise

    def _inject(self, model: nn.Module, decoder: nn.Module, adapter_name: str, config: BeaconConfig,
                **kwargs) -> None:
        self._add_beacon_embedding(decoder, adapter_name, config)
        super().inject_adapter(model, adapter_name, **kwargs)
        layers = [m for m in model.modules() if isinstance(m, BeaconAttention)]
        if len(layers) != decoder.config.num_hidden_layers:
            raise ValueError(
                f"target_modules={config.target_modules} wrapped {len(layers)} attention modules but the decoder "
                f"has {decoder.config.num_hidden_layers} layers: every layer must read the compressed memory"
            )
        self._pickers[adapter_name] = RatioPicker(config, getattr(decoder.config, "max_position_embeddings", None))
        self._patch_decoder(decoder)

    @staticmethod
    def _check_beacon_layers(decoder: nn.Module, config: BeaconConfig) -> None:
        depth = decoder.config.num_hidden_layers
        beyond = [i for i in (config.beacon_layers or []) if i >= depth]
        if beyond:
            raise ValueError(f"beacon_layers={config.beacon_layers} names layer(s) {beyond} beyond the model's "
                             f"depth: allowed [0, {depth - 1}] (num_hidden_layers={depth})")

    def _snapshot(self, model: nn.Module) -> dict:
        """What `_rollback` needs to undo a failed injection."""
        return {
            "wrapped": {id(m) for m in model.modules() if isinstance(m, BeaconAttention)},
            "patched": self._patched_decoder is not None,
            "embedding_dict": "beacon_embedding" in self._modules,
            "requires_grad": [(p, p.requires_grad) for p in model.parameters()],
            "targeted": list(self.targeted_module_names),
        }

    def _rollback(self, model: nn.Module, adapter_name: str, snapshot: dict) -> None:
        """Undo a failed injection: unpatch the decoder, unwrap new layers (or drop this adapter from layers that
        were wrapped before), delete the embedding entry, restore trainability flags."""
        if not snapshot["patched"]:
            self._unpatch_decoder()
        for name, module in list(model.named_modules()):
            if not isinstance(module, BeaconAttention):
                continue
            if id(module) in snapshot["wrapped"]:
                module.delete_adapter(adapter_name)
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.base_layer)
        if "beacon_embedding" in self._modules:
            if adapter_name in self.beacon_embedding:
                del self.beacon_embedding[adapter_name]
            if not snapshot["embedding_dict"]:
                del self.beacon_embedding
        self._pickers.pop(adapter_name, None)
        self._last_ratios.pop(adapter_name, None)
        for param, flag in snapshot["requires_grad"]:
            param.requires_grad_(flag)
        self.targeted_module_names[:] = snapshot["targeted"]

    def _add_beacon_embedding(self, decoder: nn.Module, adapter_name: str, config: BeaconConfig) -> None:
        if "beacon_embedding" not in self._modules:
            self.beacon_embedding = nn.ParameterDict()
        embed = decoder.get_input_embeddings()
        token_id = _embed_token_id(decoder, config)
        # the embedding module's output, which the beacon embedding replaces at beacon slots: the weight row itself
        # for an nn.Embedding, times sqrt(hidden) for Gemma 3's scaled embedding (a bare row would be 25x too small)
        with torch.no_grad():
            weight = embed(torch.tensor([[token_id]], device=embed.weight.device))[0].detach().clone()  # (1, H)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.beacon_embedding[adapter_name] = nn.Parameter(weight.to(dtype), requires_grad=True)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer_idx = getattr(target, "layer_idx", None)
        with_projections = peft_config.beacon_layers is None or layer_idx in peft_config.beacon_layers
        if isinstance(target, BeaconAttention):
            target.update_layer(adapter_name, peft_config, with_projections)
            return
        last_layer = layer_idx == decoder_of(self.model).config.num_hidden_layers - 1
        new_module = BeaconAttention(target, adapter_name, peft_config, with_projections, last_layer,
                                     self._anatomies.get(id(target)))
        new_module.register_forward_pre_hook(open_context, with_kwargs=True)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # attention modules carry no `weight`; beacon copies are created on their base projection's device
        setattr(parent, child_name, new_module)

    def _patch_decoder(self, decoder: nn.Module) -> None:
        if self._patched_decoder is not None:
            return
        original = decoder.forward  # bound method (or a hook wrapper set on the instance)
        decoder.__dict__["_beacon_original_forward"] = original
        decoder.forward = partial(_decoder_forward, self, original, decoder)
        self.__dict__["_patched_decoder"] = decoder

    def _unpatch_decoder(self) -> None:
        decoder = self._patched_decoder
        if decoder is None:
            return
        original = decoder.__dict__.pop("_beacon_original_forward")
        if getattr(original, "__self__", None) is decoder and original.__func__ is type(decoder).forward:
            del decoder.forward  # the class method again
        else:
            decoder.forward = original
        self.__dict__["_patched_decoder"] = None

    # --- state ------------------------------------------------------------------------------------------
    def active_beacon_adapter(self) -> Optional[str]:
        """The adapter whose beacons run, or None when adapters are disabled (then the base model runs)."""
        if not self._enabled or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise ValueError(f"only one beacon adapter can be active at a time, got {self.active_adapters}")
        return self.active_adapters[0]

    def active_beacon(self) -> Optional[ActiveBeacon]:
        """The active adapter resolved for the window loop, or None when adapters are disabled."""
        name = self.active_beacon_adapter()
        if name is None:
            return None
        if self._rope is None:  # the layers' rotary tables and conventions, read once from the wrapped layers
            self.__dict__["_rope"] = decoder_rope(decoder_of(self.model))
        return ActiveBeacon(name, self.peft_config[name], self._pickers[name], self.beacon_embedding[name], self._rope)

    def ratio_picker(self, adapter_name: str) -> RatioPicker:
        return self._pickers[adapter_name]

    def ratios_last_call(self, adapter_name: Optional[str] = None) -> list[int]:
        """Compression ratio of every window step of the most recent forward call (training included)."""
        return list(self._last_ratios.get(adapter_name or self.active_adapters[0], []))

    def set_compression_ratio(self, ratio: Optional[int], adapter_name: Optional[str] = None) -> None:
        """Force every window to ``ratio`` (an entry of ``config.ratios``), or restore ``ratio_mix`` with None."""
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of this model: allowed "
                             f"{sorted(self.peft_config)}")
        config = self.peft_config[adapter_name]
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int)):
            raise TypeError(f"ratio={ratio!r} must be an int from this adapter's ratios {config.ratios} or None")
        if ratio is not None and ratio not in config.ratios:
            raise ValueError(f"ratio={ratio} is not one of this adapter's ratios: allowed {config.ratios} or None")
        self._pickers[adapter_name].override = ratio

    @contextmanager
    def compression_ratio(self, ratio: Optional[int], adapter_name: Optional[str] = None):
        """``with model.base_model.compression_ratio(8): ...``: `set_compression_ratio` for the block, then the ratio
        forced before it (or ``ratio_mix``) again, also when the block raises."""
        adapter_name = adapter_name or self.active_adapters[0]
        before = self._pickers[adapter_name].override if adapter_name in self._pickers else None
        self.set_compression_ratio(ratio, adapter_name)
        try:
            yield self
        finally:
            self._pickers[adapter_name].override = before

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self.__dict__["_enabled"] = enabled
        for name, param in self.beacon_embedding.items():  # mirrors BaseTunerLayer.enable_adapters
            param.requires_grad_(enabled and name in self.active_adapters)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"adapter {name!r} not found; available: {sorted(self.peft_config)}")
        for module in self.model.modules():
            if isinstance(module, BeaconAttention):
                module.set_adapter(names, inference_mode=inference_mode)
        for name, param in self.beacon_embedding.items():
            param.requires_grad_(name in names and not inference_mode)
        self.active_adapter = names[0] if len(names) == 1 else names

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "Beacon adapters cannot be combined into a weighted adapter: a beacon adapter is a set of projections "
            "and an embedding for its own beacon tokens, not a weight delta to average; use set_adapter() to switch."
        )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.beacon_embedding[adapter_name]
        self._pickers.pop(adapter_name, None)
        self._last_ratios.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, merge=True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge:
            raise NotImplementedError("Beacon adapters cannot be merged into the base weights; use unload().")
        self._unpatch_decoder()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """`PeftModel.forward`/`generate` enter this with the call's keywords, then drop LoRA's per-row adapter
        keywords: refuse them instead of running every row with the active adapter."""
        for key in ("adapter_names", "alora_offsets"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}={kwargs[key]!r} is not supported by beacon adapters (mixed-adapter batches "
                                 f"are not supported: one adapter runs for the whole batch): allowed None; "
                                 f"choose the adapter with set_adapter() "
                                 f"(available: {sorted(self.peft_config)})")
        active = self.active_beacon_adapter() is not None
        if active:  # before generate() starts: it would fail on a cache of another type deep inside
            for name in CACHE_NAMES:
                check_cache_type(kwargs.get(name))
        token = beacon_call.set(active)  # for logs.NativeLengthReminderFilter
        try:
            yield
        finally:
            beacon_call.reset(token)

    def generate(self, *args: Any, **kwargs: Any):
        """The base model's ``generate()`` (`PeftModel.generate` calls this), refused up front where its calls
        could not continue each other's memory (training mode with interleaved beacons)."""
        adapter = self.active_beacon_adapter()
        if adapter is not None:
            check_continuable_calls(self.peft_config[adapter], decoder_of(self.model).training, "generate()")
        return self.model.generate(*args, **kwargs)

    def _check_labels(self, labels, args: tuple, kwargs: dict) -> None:
        """`forward.check_labels` against the call's input (``input_ids`` or ``inputs_embeds``) and the output head."""
        x = kwargs.get("input_ids", args[0] if args else None)
        x = x if x is not None else kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return  # the decoder's own checks name the bad input
        head = self.model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or self.model.config.get_text_config().vocab_size
        check_labels(labels, x.shape[0], x.shape[1], vocab)

    def forward(self, *args: Any, **kwargs: Any):
        _check_one_cache(kwargs)
        labels = kwargs.get("labels")
        adapter = self.active_beacon_adapter()
        if labels is not None and adapter is not None:
            self._check_labels(labels, args, kwargs)
        if labels is not None and adapter is not None and self.model.training:
            config = self.peft_config[adapter]
            if config.masks_first_window():
                kwargs["labels"] = mask_first_window_labels(labels, kwargs.get("attention_mask"), config.window)
                if kwargs.get("num_items_in_batch") is None:
                    _check_labels_left(labels, kwargs["labels"], config)
        return self.model(*args, **kwargs)


def _default_targets(decoder: nn.Module, config: BeaconConfig, anatomies: dict) -> None:
    """The default ``target_modules=['self_attn']`` names the attention modules of decoders whose layers call it
    something else (GPT-NeoX's ``attention``): then it names theirs, as found by role."""
    if config.target_modules != ["self_attn"]:
        return
    names = sorted({name for layer in decoder.layers for name, attn in layer.named_children() if id(attn) in anatomies})
    if names and "self_attn" not in names:
        config.target_modules = names


def _check_one_cache(kwargs: dict) -> None:
    """The causal LM keeps one of ``cache=``/``past_key_values=`` and drops the other: refuse two different ones."""
    given = {k: kwargs[k] for k in CACHE_NAMES if kwargs.get(k) is not None}
    if len({id(v) for v in given.values()}) > 1:
        raise ValueError(f"the cache was passed twice with different objects under {sorted(given)}: allowed one "
                         "(cache= on transformers >= 5.24, past_key_values= before)")


def _check_labels_left(labels: torch.Tensor, masked: torch.Tensor, config: BeaconConfig) -> None:
    """Masking the first window must not remove every prediction: a mean over no token is NaN (0/0)."""
    if bool((labels[:, 1:] != IGNORE_INDEX).any()) and not bool((masked[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError(
            f"labels of length {labels.shape[1]} hold no prediction after the first window (window={config.window}), "
            f"which training masks with placement={config.placement!r}, attention_scope={config.attention_scope!r}: "
            f"the loss would be NaN (0/0). Allowed: sequences longer than window+1={config.window + 1} tokens, "
            "mask_first_window_loss=False, or num_items_in_batch (the Trainer's) for a loss of 0"
        )


def mask_first_window_labels(labels: torch.Tensor, attention_mask: Optional[torch.Tensor], window: int) -> torch.Tensor:
    """Blank the predictions made inside each row's first window (labels are unshifted: positions 1..window).

    The adapter applies this itself in training when `BeaconConfig.masks_first_window()`; a data collator can
    call it too so that a Trainer's count of loss tokens matches.
    """
    labels = labels.clone()
    if attention_mask is None:
        labels[:, 1 : window + 1] = IGNORE_INDEX
        return labels
    rank = attention_mask.long().cumsum(1) * attention_mask.long()  # 1-based index among real tokens
    labels[(rank >= 2) & (rank <= window + 1)] = IGNORE_INDEX
    return labels
