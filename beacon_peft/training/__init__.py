"""Training beacon adapters with TRL's `SFTTrainer` (the library behind ``recipes/train.py``).

Needs the ``train`` extra (``pip install beacon-peft[train]``: trl, accelerate, datasets). Importing this package
is cheap: each name is imported from its module on first use, so ``import beacon_peft`` never imports trl.

Modules: `arguments` (the dataclasses the recipe parses), `data` (corpora, tokenization, length filters),
`collator`, `modeling` (base, 4-bit, base LoRA, beacon adapter), `callbacks` (ratio sampling and recording),
`trainer` (`BeaconSFTTrainer`, `train`), `distributed` (work-arounds for several processes), `saving` (final
adapter folder), `trained` (loading a trained folder for inference, `load_trained`), `card` (model card,
`TrainingRecord`), `evaluation` (held-out loss), `sizing` (parameter counts and memory estimates on a meta-device
model).
The read-back stage (its own plain PyTorch loop, behind ``recipes/train_readback.py``) is the `readback` package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "arguments": ["BeaconArguments", "BeaconSFTConfig", "ModelArguments", "ScriptArguments", "make_parser",
                  "parse_args", "validate_args"],
    "data": ["load_documents", "tokenize_dataset"],
    "collator": ["BeaconCollator"],
    "modeling": ["build_model", "load_base_model", "load_tokenizer", "resolve_model_path"],
    "trained": ["load_trained", "with_base_lora"],
    "callbacks": ["RatioRecorder", "StepRatioCallback", "step_ratio"],
    "trainer": ["BeaconSFTTrainer", "train"],
    "distributed": ["use_cpu_for_multiprocess_without_gpu"],
    "saving": ["save_final"],
    "card": ["TrainingRecord", "card_info", "model_card"],
    "evaluation": ["compare_heldout", "evaluate", "heldout_sequences"],
    "sizing": ["adapter_footprint", "meta_model", "training_memory"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names resolve lazily in __getattr__
    from .arguments import (
        BeaconArguments,
        BeaconSFTConfig,
        ModelArguments,
        ScriptArguments,
        make_parser,
        parse_args,
        validate_args,
    )
    from .callbacks import RatioRecorder, StepRatioCallback, step_ratio
    from .card import TrainingRecord, card_info, model_card
    from .collator import BeaconCollator
    from .data import load_documents, tokenize_dataset
    from .distributed import use_cpu_for_multiprocess_without_gpu
    from .evaluation import compare_heldout, evaluate, heldout_sequences
    from .modeling import build_model, load_base_model, load_tokenizer, resolve_model_path
    from .saving import save_final
    from .sizing import adapter_footprint, meta_model, training_memory
    from .trained import load_trained, with_base_lora
    from .trainer import BeaconSFTTrainer, train


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
