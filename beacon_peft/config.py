"""`BeaconConfig`: the settings of an Activation Beacon adapter (arXiv 2401.03462).

Terms used throughout the package (the paper's):

* **window**: a block of ``window`` raw tokens that is encoded in one forward pass together with its beacons.
* **beacon**: a special token whose keys/values, produced by its own Q/K/V projections and its own embedding,
  condense the raw activations of its window. After a window completes only its beacons' K/V stay in memory.
* **compression ratio** ``r``: one beacon per ``r`` raw tokens. Ratio 0 switches compression off (every raw
  activation is kept, as the official code's ratio 0).
* **sink**: the first ``sink_size`` activations of the sequence, kept uncompressed (attention sink).
* **memory**: per layer ``[sink ; compressed beacons of completed windows ; raw cache of the open window]``.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union, get_args

import torch
from peft.config import PeftConfig

RatioMix = Literal["fixed", "step-random", "instance-random", "adapt"]
Placement = Literal["interleave", "append"]
AttentionScope = Literal["full-coverage", "step-expansion", "segmentation"]
Projection = Literal["q", "k", "v", "o"]
EmbedInit = Literal["eos", "bos"]

# the allowed values, derived from the types (one list per concept)
RATIO_MIXES: tuple[str, ...] = get_args(RatioMix)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
SCOPES: tuple[str, ...] = get_args(AttentionScope)
PROJECTIONS: tuple[str, ...] = get_args(Projection)
EMBED_INITS: tuple[str, ...] = get_args(EmbedInit)
# input tokens per decoder pass when `group_tokens` is None, by device type (docs/benchmarks.md, "Grouped
# execution"): an accelerator is bound by launches, so one pass should hold many windows; on the CPU a pass of
# 16K tokens ran 0.69x full attention's prefill at 8K against 0.61x at 2K (its caches favour short passes)
GROUP_TOKENS = {"cpu": 2048, "accelerator": 16384}


def _offline_base(name):
    """The folder of an adapter's base that this machine holds offline (SmolLM2-135M-Instruct's Hub id -> its
    offline copy, `offline.weights.resolve_base`), else ``name`` unchanged. `BeaconConfig` maps its
    ``base_model_name_or_path`` through this (when made or loaded, and when set), so
    `AutoPeftModelForCausalLM.from_pretrained(adapter)` loads the base without the network (it retried the Hub for
    about a minute, then failed) and `save_pretrained` reads the base's config.json locally instead of asking the
    Hub (two warnings offline); `to_dict` saves the Hub id again."""
    if not isinstance(name, str) or not name:
        return name
    from .offline.weights import resolve_base

    return resolve_base(name)


class BeaconPeftType(str, enum.Enum):
    """PEFT's `PeftType` enum is closed, so the adapter type lives in its own str-enum.

    Being a ``str`` subclass, ``"BEACON"`` read back from ``adapter_config.json`` finds the same mapping keys.
    """

    BEACON = "BEACON"


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} is out of range: allowed {allowed}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {list(choices)}")


@dataclass
class BeaconConfig(PeftConfig):
    """Configuration of an Activation Beacon adapter.

    Args:
        window (`int`): Raw tokens per window (the paper's ``L``; official ``beacon_window``).
        stride (`int`, *optional*): Raw tokens a window advances by; defaults to ``window``. ``stride < window``
            (overlapping windows) is only allowed with ``placement="append"``: each full window then gets
            ``stride / r`` beacons and the last ``window - stride`` raw activations stay in memory as the start of
            the next window.
        ratios (`list[int]`): Candidate compression ratios. Each must be 0 (no compression: raw activations are
            kept, as the official ratio 0) or a positive divisor of ``stride``.
        ratio_mix (`str`): How a ratio is chosen: ``"fixed"`` (exactly one ratio), ``"step-random"`` (drawn for
            every window step, the official training default), ``"instance-random"`` (drawn once per sequence),
            ``"adapt"`` (per sequence, the smallest ratio whose compressed length fits the base model's
            positions). With a single ratio every mode returns it without drawing.
        adapt_future_tokens (`int`): Tokens expected after the input (e.g. ``max_new_tokens``) when
            ``ratio_mix="adapt"`` sizes the sequence.
        ratio_seed (`int`, *optional*): Seed of the adapter's own ratio generator. ``None`` draws from Python's
            global ``random`` (seeded, saved and restored by `transformers.Trainer`).
        placement (`str`): ``"interleave"`` (a beacon after every ``r`` raw tokens, the default) or ``"append"``
            (``stride / r`` beacons after the window's raw tokens).
        attention_scope (`str`): What a beacon sees of its window's raw tokens: ``"full-coverage"`` (all of them
            that precede it, the default), ``"step-expansion"`` (beacon ``j`` sees raw tokens ``0 .. (j+1)r-1``),
            ``"segmentation"`` (beacon ``j`` sees raw tokens ``jr .. (j+1)r-1`` only).
        attend_prev (`bool`): Whether a beacon sees the earlier beacons of its own window (ignored by
            full-coverage, as in the official code).
        sink_size (`int`): Leading activations kept uncompressed (attention sink).
        beacon_projections (`list[str]`): Which attention projections get a beacon copy: a subset of
            ``q, k, v, o``. Raw tokens always use the frozen base projections.
        embed_init (`str`): Initialise the beacon embedding from the ``"eos"`` or ``"bos"`` token embedding.
        beacon_rank (`int`, *optional*): ``None`` (default, as the official code): each beacon projection is a
            full trainable copy of the base projection. An int: each beacon projection is the frozen base
            projection plus a trainable low-rank delta ``B @ A`` of that rank (B starts at zero), which keeps an
            8B model's adapter small enough for QLoRA training on one GPU.
        mask_first_window_loss (`bool`, *optional*): In training, exclude the first window's predictions from
            the loss. ``None`` follows the official code: masked unless interleave + full-coverage.
        target_modules (`list[str]` or `str`, *optional*): Attention modules to wrap (names or a regex); by
            default every module named ``self_attn``.
        beacon_layers (`list[int]`, *optional*): Only these decoder layers get beacon projections; the
            others use their base projections for beacons too (memory is still compressed in every layer).
        group_tokens (`int`, *optional*): How many input tokens (per row) one decoder pass may read. Consecutive
            windows are grouped up to this budget and go through the decoder layer by layer together (one pass of
            big matrix products instead of one pass per window; exact, see docs/semantics.md); a pass holds these
            tokens plus their beacons (``1/r`` more). It bounds the activation memory of a call whatever the
            input's length; any value up to ``window`` (e.g. 1) runs the window-by-window loop. ``None`` (default)
            chooses by device: 16384 on an accelerator, 2048 on the CPU (measured, docs/benchmarks.md). It
            changes speed and peak memory, never results (up to floating-point summation order).
        target_parameters: Unused; present because PEFT reads it when ``target_modules`` is None.
    """

    window: int = field(default=1024, metadata={"help": "Raw tokens per window."})
    stride: Optional[int] = field(default=None, metadata={"help": "Window stride; defaults to `window`."})
    ratios: list[int] = field(default_factory=lambda: [8], metadata={"help": "Candidate compression ratios."})
    ratio_mix: RatioMix = field(default="step-random", metadata={"help": f"One of {list(RATIO_MIXES)}."})
    adapt_future_tokens: int = field(default=128, metadata={"help": "Future tokens assumed by ratio_mix='adapt'."})
    ratio_seed: Optional[int] = field(default=None, metadata={"help": "Seed of the ratio generator."})
    placement: Placement = field(default="interleave", metadata={"help": f"One of {list(PLACEMENTS)}."})
    attention_scope: AttentionScope = field(default="full-coverage", metadata={"help": f"One of {list(SCOPES)}."})
    attend_prev: bool = field(default=True, metadata={"help": "Beacons see earlier beacons of their window."})
    sink_size: int = field(default=0, metadata={"help": "Uncompressed leading activations."})
    beacon_projections: list[Projection] = field(
        default_factory=lambda: ["q", "k", "v"], metadata={"help": "Subset of q, k, v, o with beacon copies."}
    )
    embed_init: EmbedInit = field(default="eos", metadata={"help": "Beacon embedding init: 'eos' or 'bos'."})
    beacon_rank: Optional[int] = field(
        default=None, metadata={"help": "None: full beacon copies; int: frozen base + trainable low-rank delta."}
    )
    mask_first_window_loss: Optional[bool] = field(
        default=None, metadata={"help": "Mask the first window's loss in training (None: official rule)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Attention modules to wrap; default: every `self_attn`."}
    )
    beacon_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Decoder layers that get beacon projections (default: all)."}
    )
    group_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "Input tokens (per row) one decoder pass may read; 1: window by window; None: "
                          f"{GROUP_TOKENS['accelerator']} on an accelerator, {GROUP_TOKENS['cpu']} on the CPU."},
    )
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Unused."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BeaconPeftType.BEACON
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"  # beacons compress decoder-only causal LMs
        elif str(self.task_type) != "CAUSAL_LM":
            raise ValueError(f"task_type={self.task_type!r} is not supported: Activation Beacon needs 'CAUSAL_LM'")
        if self.target_modules is None:
            self.target_modules = ["self_attn"]
        names = self.target_modules
        listed = isinstance(names, (list, tuple, set)) and bool(names) and all(isinstance(m, str) for m in names)
        if not (listed or isinstance(names, str)):
            raise TypeError(f"target_modules={names!r} must be None (every 'self_attn'), a regex string or a non-empty "
                            "list of module names (str)")
        if listed:
            self.target_modules = sorted(set(names))
        if self.stride is None:
            self.stride = self.window
        _check_int("window", self.window, 1)
        _check_int("stride", self.stride, 1, self.window)
        if isinstance(self.ratios, int) or not isinstance(self.ratios, (list, tuple)) or not self.ratios:
            raise TypeError(f"ratios must be a non-empty list of ints, got {self.ratios!r}")
        self.ratios = [int(r) if not isinstance(r, bool) and isinstance(r, int) else r for r in self.ratios]
        for r in self.ratios:
            _check_int("ratios entry", r, 0, self.stride)
            if r > 0 and self.stride % r:
                divisors = [d for d in range(1, self.stride + 1) if self.stride % d == 0]
                shown = divisors if len(divisors) <= 16 else divisors[:8] + ["..."] + divisors[-4:]
                raise ValueError(f"ratio {r} does not divide stride {self.stride}: allowed 0 or one of {shown}")
        _check_choice("ratio_mix", self.ratio_mix, RATIO_MIXES)
        if self.ratio_mix == "fixed" and len(set(self.ratios)) != 1:
            raise ValueError(f"ratio_mix='fixed' needs exactly one ratio, got ratios={self.ratios}")
        _check_int("adapt_future_tokens", self.adapt_future_tokens, 0)
        if self.ratio_seed is not None:
            _check_int("ratio_seed", self.ratio_seed, 0)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("attention_scope", self.attention_scope, SCOPES)
        if self.interleaved and self.stride != self.window:
            raise ValueError(
                f"stride={self.stride} != window={self.window} needs placement='append': interleaved beacons "
                "cannot cover overlapping windows"
            )
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"inference_mode must be a bool, got {self.inference_mode!r}")
        if not isinstance(self.attend_prev, bool):
            raise TypeError(f"attend_prev must be a bool, got {self.attend_prev!r}")
        _check_int("sink_size", self.sink_size, 0, self.window)
        if not isinstance(self.beacon_projections, (list, tuple)) or not self.beacon_projections:
            raise TypeError(f"beacon_projections={self.beacon_projections!r} must be a non-empty list: allowed "
                            f"distinct entries of {list(PROJECTIONS)}, e.g. ['q', 'k', 'v']")
        projections = list(self.beacon_projections)
        bad = [p for p in projections if p not in PROJECTIONS]
        if bad or len(set(projections)) != len(projections):
            raise ValueError(f"beacon_projections={projections} must be distinct entries of {list(PROJECTIONS)}")
        self.beacon_projections = [p for p in PROJECTIONS if p in projections]
        _check_choice("embed_init", self.embed_init, EMBED_INITS)
        if self.beacon_rank is not None:
            _check_int("beacon_rank", self.beacon_rank, 1)
        if self.mask_first_window_loss is not None and not isinstance(self.mask_first_window_loss, bool):
            raise TypeError(f"mask_first_window_loss must be a bool or None, got {self.mask_first_window_loss!r}")
        if self.group_tokens is not None:
            _check_int("group_tokens", self.group_tokens, 1)
        if self.beacon_layers is not None:
            layers = [self.beacon_layers] if isinstance(self.beacon_layers, int) else self.beacon_layers
            if not isinstance(layers, (list, tuple)) or not layers:
                raise TypeError(f"beacon_layers={self.beacon_layers!r} must be None or a non-empty list of decoder "
                                "layer indices (ints >= 0)")
            for index in layers:
                _check_int("beacon_layers entry", index, 0)
            self.beacon_layers = sorted(set(layers))
        self.__dict__["_beacon_checked"] = True  # from here on, a base this machine holds offline maps to it
        self.base_model_name_or_path = self.base_model_name_or_path

    def __setattr__(self, name: str, value) -> None:
        if name == "base_model_name_or_path" and self.__dict__.get("_beacon_checked"):
            value = _offline_base(value)
        super().__setattr__(name, value)

    @classmethod
    def from_peft_type(cls, **kwargs):
        """`PeftConfig.from_peft_type` (which `from_pretrained` ends in), refusing keys that are not `BeaconConfig`
        fields: PEFT drops keys it does not know with a warning, and for a beacon adapter a dropped setting would
        change what it computes silently, so an unknown key is a ValueError naming it, before anything is loaded."""
        if kwargs.get("peft_type", BeaconPeftType.BEACON) == BeaconPeftType.BEACON:
            cls._refuse_unknown(kwargs)
        return super().from_peft_type(**kwargs)

    def to_dict(self) -> dict:
        """The saved fields; a base held offline (`_offline_base`) is saved under its Hub id, never the local
        cache folder."""
        out = super().to_dict()
        if out.get("base_model_name_or_path"):
            from .offline.weights import hub_id

            out["base_model_name_or_path"] = hub_id(out["base_model_name_or_path"])
        return out

    @classmethod
    def _refuse_unknown(cls, kwargs: dict) -> None:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise ValueError(f"the beacon adapter config holds {unknown}, which this beacon_peft does not understand "
                             f"(a newer version's setting, or a typo): allowed the BeaconConfig fields "
                             f"{sorted(known - set(PeftConfig.__dataclass_fields__))} and PEFT's common ones; "
                             "upgrade beacon_peft or remove the key")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs):
        """`PeftConfig.from_pretrained`, remembering a local folder so that injection can check the adapter's
        weights against the model before it touches it (see `checkpoint.check_adapter_weights`)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if isinstance(config, BeaconConfig) and os.path.isdir(folder):
            config.__dict__["_beacon_source"] = folder  # not a dataclass field: never saved
        return config

    # --- predicates: the one place where the settings' strings are compared ---------------------------------
    @property
    def interleaved(self) -> bool:
        """A beacon after every ``r`` raw tokens (placement ``"interleave"``); else ``stride / r`` appended."""
        return self.placement == "interleave"

    @property
    def scoped(self) -> bool:
        """Beacons see only part of their window (``"step-expansion"`` or ``"segmentation"``)."""
        return self.attention_scope != "full-coverage"

    @property
    def segmented(self) -> bool:
        """Beacon ``j`` sees raw tokens ``jr .. (j+1)r-1`` only (``"segmentation"``)."""
        return self.attention_scope == "segmentation"

    @property
    def compresses(self) -> bool:
        """True when at least one candidate ratio actually compresses (ratio > 0)."""
        return any(r > 0 for r in self.ratios)

    def pass_tokens(self, device) -> int:
        """The input tokens one decoder pass reads on ``device`` (`group_tokens`, or its default for the device)."""
        if self.group_tokens is not None:
            return self.group_tokens
        return GROUP_TOKENS["cpu" if torch.device(device).type == "cpu" else "accelerator"]

    def masks_first_window(self) -> bool:
        """The official training rule: the first window's labels are blanked unless interleave + full-coverage."""
        if self.mask_first_window_loss is not None:
            return self.mask_first_window_loss
        return not (self.interleaved and not self.scoped)
