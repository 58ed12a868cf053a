"""Registers the ``BEACON`` adapter type with PEFT. Idempotent; runs when `beacon_peft` is imported.

PEFT's own route, ``peft.utils.register_peft_method``, only accepts names already in its closed `PeftType` enum
(checked with PEFT 0.21). So the package has its own str-enum (`BeaconPeftType.BEACON == "BEACON"`, the
``peft_type`` of a `BeaconConfig`) and adds it to PEFT's three mappings directly: config class, tuner class and
parameter prefix. Being a str-enum, the ``"BEACON"`` read back from an ``adapter_config.json`` finds the same
entries, so `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained`, `load_adapter` and the other PEFT
entry points accept the adapter.
"""

from __future__ import annotations

import peft.mapping as mapping

from .config import BeaconConfig, BeaconPeftType
from .model import BeaconModel


def register() -> None:
    """Add ``BEACON`` to PEFT's config, tuner and prefix mappings (overwriting its own earlier entries)."""
    key = BeaconPeftType.BEACON
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = BeaconConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = BeaconModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = BeaconModel.prefix
