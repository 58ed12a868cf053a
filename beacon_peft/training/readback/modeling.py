"""The read-back stage's model: the frozen base (optionally with a LoRA on its own projections) and the beacon
adapter, started from an earlier adapter folder when asked (`load`)."""

from __future__ import annotations

import re
from pathlib import Path

from ...precision import resolve_dtype


def load(args):
    """Base (frozen) + beacon adapter on the device; trainable parameters in float32."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    import beacon_peft
    from beacon_peft.offline.weights import load_smollm2

    if args.model == "offline:smollm2":
        base, tokenizer = load_smollm2(dtype=resolve_dtype(args.dtype, args.device))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype, args.device))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base.to(args.device)
    if args.base_lora_r:  # before the beacon wrapper: raw tokens go through base + LoRA, beacons through their own
        from peft import inject_adapter_in_model

        from beacon_peft.training.modeling import LORA_DIR

        base = inject_adapter_in_model(base_lora_config(args), base, adapter_name=LORA_DIR)
    config = beacon_peft.BeaconConfig(window=args.window, ratios=list(args.ratios), ratio_mix="step-random",
                                      sink_size=args.sink_size, beacon_projections=list(args.beacon_projections))
    model = get_peft_model(base, config)
    if args.init_adapter:
        saved = load_file(str(Path(args.init_adapter) / "adapter_model.safetensors"))
        check_init_keys(set(get_peft_model_state_dict(model)), set(saved), args.init_adapter)
        set_peft_model_state_dict(model, saved)
    load_init_lora(model, args)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def base_lora_config(args, base_name: str | None = None):
    """The base LoRA's PEFT config (no dropout: the curve and the resume test compare exact numbers)."""
    from peft import LoraConfig

    return LoraConfig(r=args.base_lora_r, lora_alpha=args.base_lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(args.base_lora_targets), task_type="CAUSAL_LM",
                      base_model_name_or_path=base_name)


def load_init_lora(model, args) -> None:
    """Make the base LoRA (if any) trainable again after ``get_peft_model`` froze it, and fill it from
    ``--init_adapter``'s ``base_lora/`` when that folder has one (a LoRA starts at zero otherwise: B = 0, so the
    model computes what the beacon adapter alone did). A folder with a base LoRA and a run without one is a
    ValueError: the run would silently drop half of what the folder's model computes."""
    from beacon_peft.training.modeling import LORA_DIR, load_lora_state_dict, lora_layers

    folder = Path(args.init_adapter) / LORA_DIR if args.init_adapter else None
    if folder is not None and folder.is_dir() and not args.base_lora_r:
        raise ValueError(f"init_adapter={args.init_adapter} holds a base LoRA ({folder}): allowed only with "
                         "--base_lora_r > 0 and the same LoRA settings")
    for _, layer in lora_layers(model):
        layer.set_adapter(LORA_DIR)  # requires_grad on its parameters again
    if folder is not None and folder.is_dir():
        from safetensors.torch import load_file

        load_lora_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))


def check_init_keys(expected: set[str], given: set[str], folder) -> None:
    """The ``--init_adapter`` folder must fill every adapter weight of the model, except the beacon copies of
    projections the folder's adapter did not have (``beacon_o`` when q/k/v grow to q/k/v/o), which keep their
    initialisation as copies of the base projection, so the model starts computing exactly what the folder's adapter
    did. Anything else missing, or a weight the model lacks, is a ValueError (a silent partial load would train
    from a different start than the one recorded)."""
    unknown = sorted(given - expected)
    if unknown:
        raise ValueError(f"init_adapter={folder}: {len(unknown)} weights this model's adapter lacks, e.g. "
                         f"{unknown[:3]} (other settings: window, sink, projections, base model?)")

    def projection(name: str) -> str | None:  # "q" for ...self_attn.beacon_q.weight, None for anything else
        found = re.search(r"\.beacon_([qkvo])\.", name)
        return found.group(1) if found else None

    present = {projection(name) for name in given} - {None}
    unfilled = [name for name in sorted(expected - given) if projection(name) in present | {None}]
    if unfilled:
        raise ValueError(f"init_adapter={folder}: {len(unfilled)} weights missing, e.g. {unfilled[:3]}: allowed "
                         "missing only the copies of projections the folder's adapter did not have")
