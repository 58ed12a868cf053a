"""Registers the ``BEACON`` adapter type with PEFT (its `PeftType` enum is closed, so the mappings are extended
directly; see ../shared/STACK.md). Idempotent; runs when `beacon_peft` is imported."""

from __future__ import annotations

import peft.mapping as mapping

from .config import BeaconConfig, BeaconPeftType
from .model import BeaconModel


def register() -> None:
    key = BeaconPeftType.BEACON
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = BeaconConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = BeaconModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = BeaconModel.prefix
