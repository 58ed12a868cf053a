"""The transformers seam (beacon_peft.compat): the memory is found under `cache=` and `past_key_values=`, in inputs
and outputs, whichever the installed release uses; the declared range and the warning agree with pyproject.toml."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version
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


def test_docs_state_every_declared_range():
    """docs/versions.md names each bounded dependency of pyproject.toml with the same range (a raised cap is
    written down with the results that admitted it)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = meta["dependencies"] + [d for name, extra in meta["optional-dependencies"].items() for d in extra
                                    if name != "test"]  # the linter's pin is no tested range
    bounded = [d for d in specs if "<" in d]
    assert {re.split(r"[<>=]", d)[0] for d in bounded} >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    docs = (ROOT / "docs" / "versions.md").read_text()
    assert [d for d in bounded if f"`{d}`" not in docs] == []


def test_locked_versions_lie_inside_the_declared_range():
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    locked = re.search(r"^transformers==([0-9.]+)$", lock, re.M).group(1)
    assert compat.version_problem(locked) is None


def _edges() -> list[tuple[str, bool]]:
    """Versions at both ends of the declared range, read from compat (the bounds move: never written out here)."""
    low, below = Version(compat.TRANSFORMERS_MIN).release, Version(compat.TRANSFORMERS_BELOW).release
    major, minor = below[0], below[1]
    last_minor = f"{major}.{minor - 1}" if minor else f"{major - 1}.999"
    before_low = f"{low[0]}.{low[1] - 1}.99" if low[1] else f"{low[0] - 1}.999.0"
    return [(compat.TRANSFORMERS_MIN, True), (f"{last_minor}.0", True), (f"{last_minor}.99", True),
            (before_low, False), (f"{major}.{minor}.0", False), (f"{major}.{minor}.1", False),
            (f"{major + 1}.0.0", False)]


@pytest.mark.parametrize("version, ok", _edges())
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


@pytest.mark.parametrize("ok", [True, False], ids=["inside", "outside"])
def test_check_versions_reads_the_installed_transformers(monkeypatch, ok):
    """With no argument the check reads transformers.__version__: no warning inside the range, exactly the one
    sentence of `version_problem` outside it."""
    installed = compat.TRANSFORMERS_MIN if ok else compat.TRANSFORMERS_BELOW
    monkeypatch.setattr(sys.modules["transformers"], "__version__", installed)  # the module compat imports
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.check_versions()
    messages = [(w.category, str(w.message)) for w in caught if w.category is RuntimeWarning]
    assert messages == ([] if ok else [(RuntimeWarning, compat.version_problem(installed))])


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


IMPORT_UNDER_FAKED_VERSION = """
import json, sys, warnings
import peft  # noqa: F401  (importing PEFT puts a new transformers module object in sys.modules: fake it after)
sys.modules["transformers"].__version__ = sys.argv[1]  # an installed transformers outside the declared range
def ours(caught):
    return [[w.category.__name__, str(w.message)] for w in caught if "beacon_peft was tested" in str(w.message)]
with warnings.catch_warnings(record=True) as on_import:
    warnings.simplefilter("always")
    import beacon_peft
with warnings.catch_warnings(record=True) as again:
    warnings.simplefilter("always")
    beacon_peft.compat.check_versions()  # a second check in the same process: no second warning
print(json.dumps([ours(on_import), ours(again)]))
"""


def test_importing_beacon_peft_warns_once_outside_the_range():
    """`import beacon_peft` under a transformers version just past the declared range (faked before the import, in a
    fresh interpreter): exactly one RuntimeWarning, the sentence that names both versions, and none from a later
    check in the same process."""
    outside = f"{compat.TRANSFORMERS_BELOW}.0"
    done = subprocess.run([sys.executable, "-c", IMPORT_UNDER_FAKED_VERSION, outside], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    on_import, again = json.loads(done.stdout.strip().splitlines()[-1])
    assert on_import == [["RuntimeWarning", compat.version_problem(outside)]] and again == []
