"""The transformers seam (beacon_peft.compat): the memory is found under `cache=` and `past_key_values=`, in inputs
and outputs, whichever the installed release uses; the declared range and the warning agree with pyproject.toml."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model
from tiny import random_ids, tiny_model

from beacon_peft import BeaconConfig, BeaconMemory, compat

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_range_the_warning_checks():
    text = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', text)
    assert spec, "pyproject.toml must bound transformers on both sides"
    assert spec.groups() == (compat.TRANSFORMERS_MIN, compat.TRANSFORMERS_BELOW)
    oldest = (ROOT / "requirements" / "oldest.txt").read_text()
    assert f"transformers=={compat.TRANSFORMERS_MIN}" in oldest


def test_locked_versions_lie_inside_the_declared_range():
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    locked = re.search(r"^transformers==([0-9.]+)$", lock, re.M).group(1)
    assert compat.version_problem(locked) is None


@pytest.mark.parametrize("version, ok", [("5.23.0", True), ("5.24.0", True), ("5.25.0", True), ("5.25.9", True),
                                         ("5.22.9", False), ("5.26.0", False), ("6.0.0", False)])
def test_version_problem_names_the_versions(version, ok):
    problem = compat.version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert version in problem and compat.TRANSFORMERS_MIN in problem and compat.TRANSFORMERS_BELOW in problem


def test_warns_once_outside_the_range(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.check_versions("9.0.0")
        compat.check_versions("9.0.0")
    hits = [w for w in caught if "9.0.0" in str(w.message)]
    assert len(hits) == 1 and issubclass(hits[0].category, RuntimeWarning)


def test_installed_version_is_inside_the_range_or_warned():
    assert compat.version_problem(transformers.__version__) is None or compat._warned


def test_take_cache_accepts_every_name_and_refuses_two_objects():
    a, b = object(), object()
    for name in compat.CACHE_NAMES:
        kwargs = {name: a, "other": 1}
        assert compat.take_cache(kwargs) is a and kwargs == {"other": 1}
    assert compat.take_cache({"cache": a, "past_key_values": a}) is a
    assert compat.take_cache({"cache": None, "past_key_values": a}) is a
    with pytest.raises(ValueError, match="passed twice"):
        compat.take_cache({"cache": a, "past_key_values": b})


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_continuing_under_either_keyword_equals_one_call(name):
    """The regression of transformers 5.24: a memory passed under the other name must not be dropped."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=16, ratios=[4])).eval()
    ids = random_ids(1, 70)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :37])
        memory = compat.output_cache(first)
        assert isinstance(memory, BeaconMemory) and memory.get_seq_length() == 37
        rest = model(input_ids=ids[:, 37:], **{name: memory}).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, atol=1e-5, rtol=1e-5)


def test_generate_carries_the_memory_from_step_to_step():
    """generate() must hand each step the memory of the previous one (an empty memory per step gave wrong text)."""
    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=16, ratios=[4])).eval()
    prompt = random_ids(1, 40)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        logits = model(input_ids=out[:, :-1]).logits[0, 39:]
    assert torch.equal(logits.argmax(-1), out[0, 40:])


def test_beacon_peft_import_checks_versions():
    import beacon_peft

    assert "check_versions" in (ROOT / "beacon_peft" / "__init__.py").read_text()
    assert beacon_peft.compat is sys.modules["beacon_peft.compat"]
