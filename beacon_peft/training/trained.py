"""Loading a trained adapter folder for inference: the base (+ the LoRA of the base a read-back or ``--use_lora``
run writes in ``base_lora/``) and the beacon adapter over it."""

from __future__ import annotations

from pathlib import Path

from ..config import BeaconConfig
from ..offline.weights import SMOLLM2_HUB_ID
from .modeling import LORA_DIR, resolve_model_path


def with_base_lora(base_model, adapter_dir, merge: bool = False):
    """``base_model`` with the LoRA of the base an adapter folder holds in ``base_lora/`` (none: unchanged).

    Unmerged (default), the LoRA layers stay in the base, so disabling the beacon adapter loaded over it
    (``with model.disable_adapter():``) disables them too and gives the plain base (full attention); merged, the
    base's weights change for good.
    """
    from peft import PeftModel

    lora = Path(adapter_dir) / LORA_DIR
    if not lora.is_dir():
        return base_model
    wrapped = PeftModel.from_pretrained(base_model, str(lora), adapter_name=LORA_DIR)
    return wrapped.merge_and_unload() if merge else wrapped.base_model.model


def load_trained(adapter_dir: str, base_model=None, merge_lora: bool = True, adapter_name: str = "default",
                 **load_kwargs):
    """Load a trained adapter folder for inference: base (+ its LoRA, merged by default; `with_base_lora`) + beacon
    adapter (named ``adapter_name``). The base defaults to the adapter's ``base_model_name_or_path``, SmolLM2's
    Hub id mapped to the offline copy (`beacon_peft.offline.weights.resolve_base`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..offline.weights import carry_hub_id, hub_id, resolve_base

    adapter_dir = str(adapter_dir)
    if base_model is None:
        name = BeaconConfig.from_pretrained(adapter_dir).base_model_name_or_path
        if not name:
            raise ValueError(f"adapter {adapter_dir} names no base_model_name_or_path: pass base_model=")
        path = resolve_base(resolve_model_path(name))
        base_model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        if hub_id(path) == SMOLLM2_HUB_ID:
            carry_hub_id(base_model)
    base_model = with_base_lora(base_model, adapter_dir, merge=merge_lora)
    return PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name)
