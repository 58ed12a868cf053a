"""Fixtures shared by the test modules of tests/ (tests/training has its own conftest.py too)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    """The offline SmolLM2 tokenizer (rows, phrasings, facts and synthetic data are built with it)."""
    from transformers import AutoTokenizer

    from beacon_peft.offline import weights

    return AutoTokenizer.from_pretrained(weights.smollm2_dir())
