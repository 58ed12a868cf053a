"""scripts/golden.py's check: green when nothing changed, even against a baseline dumped before new tensors were
added; red when a compared tensor differs or a baseline tensor is no longer made (issue 38, item 5)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SPEC = importlib.util.spec_from_file_location("golden", Path(__file__).resolve().parents[1] / "scripts/golden.py")
golden = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(golden)

BEFORE = {"llama/interleave/sdpa/logits": torch.arange(6.0).view(2, 3), "llama/ratio0/sdpa/grad/q": torch.ones(4)}


def test_new_tensors_are_listed_not_failed():
    now = {**BEFORE, "llama/ratio0/sdpa/grad/beacon_embedding": torch.zeros(8)}
    code, lines = golden.compare(BEFORE, now)
    assert code == 0
    assert "2 compared, 0 differ" in lines[0] and "0 missing, 1 new" in lines[0]
    assert "   new: llama/ratio0/sdpa/grad/beacon_embedding" in lines
    assert golden.compare(BEFORE, now, strict=True)[0] == 1


def test_a_difference_or_a_missing_tensor_fails():
    changed = {**BEFORE, "llama/interleave/sdpa/logits": BEFORE["llama/interleave/sdpa/logits"] + 1e-3}
    code, lines = golden.compare(BEFORE, changed)
    assert code == 1 and "1 differ" in lines[0] and "   differs: llama/interleave/sdpa/logits" in lines
    assert golden.compare(BEFORE, changed, atol=2e-3)[0] == 0  # within a tolerance when one is given
    code, lines = golden.compare(BEFORE, {"llama/interleave/sdpa/logits": BEFORE["llama/interleave/sdpa/logits"]})
    assert code == 1 and "1 missing" in lines[0]
