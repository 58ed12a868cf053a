"""Helpers to load tests/fixtures/reference (outputs of the official Activation Beacon code, vendored: see
tests/fixtures/README.md) through our converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
VARIANTS = {"r2_s0": {"ratios": [2], "sink_size": 0}, "r4_s1": {"ratios": [4], "sink_size": 1}}


def require_reference() -> Path:
    if not (REFERENCE / "model.safetensors").exists():
        pytest.skip(f"official reference outputs not found at {REFERENCE} (vendored in the repository: is the "
                    "checkout complete?)")
    return REFERENCE


def converted(tmp_root: Path) -> tuple[Path, dict[str, Path]]:
    """Convert the reference checkpoint once; one adapter folder per variant (r4_s1 overrides ratio and sink)."""
    from beacon_peft import convert_official

    ref = require_reference()
    base_dir, adapters = tmp_root / "base", {}
    convert_official(ref, tmp_root / "adapter-r2_s0", base_dir=base_dir)
    for name, overrides in VARIANTS.items():
        folder = tmp_root / f"adapter-{name}"
        if not folder.exists():
            (tmp_root / "adapter-r2_s0").mkdir(exist_ok=True)
            folder.mkdir()
            for f in (tmp_root / "adapter-r2_s0").iterdir():
                (folder / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(overrides)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        adapters[name] = folder
    return base_dir, adapters


def load_model(base_dir: Path, adapter_dir: Path, attn: str = "eager", **overrides):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import beacon_peft  # noqa: F401  (registers BEACON)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation=attn)
    model = PeftModel.from_pretrained(base, adapter_dir)
    for key, value in overrides.items():
        setattr(model.peft_config["default"], key, value)
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "cases" / "inputs.safetensors")


def outputs(variant: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(REFERENCE / "cases" / f"{variant}.safetensors")
    meta = json.loads((REFERENCE / "cases" / f"{variant}.json").read_text())["cases"]
    return tensors, meta
