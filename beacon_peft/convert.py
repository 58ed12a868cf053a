"""Convert an official Activation Beacon checkpoint (FlagOpen/FlagEmbedding, research/Long_LLM/activation_beacon)
into a standard PEFT adapter folder, and optionally into a stock transformers base-model folder.

An official folder holds a ``config.json`` with ``beacon_*`` fields and weights that include
``model.beacon_embed_tokens.weight`` and ``model.layers.{i}.self_attn.beacon_{q,k,v,o}_proj.{weight,bias}``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .config import BeaconConfig

PathLike = Union[str, os.PathLike]
EMBED_KEY = "model.beacon_embed_tokens.weight"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
COPY_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def config_from_official(official: dict) -> BeaconConfig:
    """The `BeaconConfig` equivalent to an official config's ``beacon_*`` fields (ValueError if it has none)."""
    if "beacon_window" not in official:
        raise ValueError("not an official Activation Beacon config: it has no `beacon_window` field")
    parallel = official.get("beacon_parallel_window", 1)
    if parallel != 1:
        raise ValueError(f"beacon_parallel_window={parallel} is not supported: only 1 (sequential windows)")
    mix = official.get("beacon_ratio_mix", "step-random")
    future = 128
    if mix.startswith("adapt"):
        mix, _, tail = mix.partition("-")
        future = int(tail) if tail else future
    attn = official.get("beacon_attn", "full-coverage").replace("converage", "coverage")
    return BeaconConfig(
        window=official["beacon_window"],
        stride=official.get("beacon_stride", official["beacon_window"]),
        ratios=list(official.get("beacon_ratio", [8])),
        ratio_mix=mix,
        adapt_future_tokens=future,
        placement=official.get("beacon_pos", "interleave"),
        attention_scope=attn,
        attend_prev=bool(official.get("beacon_attend_prev", True)),
        sink_size=official.get("beacon_sink_size", 0),
        beacon_projections=list(official.get("beacon_param", ["q", "k", "v"])),
        embed_init=official.get("beacon_embed_init", "eos"),
    )


def _load_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(src / name))
        return state
    if (src / "model.safetensors").exists():
        return load_file(src / "model.safetensors")
    if (src / "pytorch_model.bin").exists():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{src} holds no model weights (looked for model.safetensors[.index.json], "
                            "pytorch_model.bin)")


def _adapter_key(name: str) -> Optional[str]:
    if name == EMBED_KEY:
        return "base_model.beacon_embedding"
    for p in "qkvo":
        marker = f".beacon_{p}_proj."
        if marker in name:
            return "base_model.model." + name.replace(marker, f".beacon_{p}.")
    return None


def convert_official(src_dir: PathLike, adapter_dir: PathLike, base_dir: Optional[PathLike] = None) -> BeaconConfig:
    """Write a PEFT adapter folder (and, with ``base_dir``, a stock base-model folder) from an official one.

    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)`` then reproduces
    the official model. Each folder is written to a temporary sibling and moved into place at the end, so a
    failure never leaves a half-written folder. Returns the adapter's `BeaconConfig`.
    """
    src = Path(src_dir)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json: pass an official Activation Beacon checkpoint folder")
    official = json.loads((src / "config.json").read_text())
    config = config_from_official(official)
    weights = _load_weights(src)
    adapter = {key: w.contiguous() for name, w in weights.items() if (key := _adapter_key(name))}
    if "base_model.beacon_embedding" not in adapter:
        raise ValueError(f"{src} has no `{EMBED_KEY}`: not an Activation Beacon checkpoint")
    present = {p for p in "qkvo" if any(f".beacon_{p}." in k for k in adapter)}
    if present != set(config.beacon_projections):
        raise ValueError(f"beacon_param={config.beacon_projections} but the weights hold beacon projections "
                         f"{sorted(present)}")
    config.base_model_name_or_path = str(base_dir) if base_dir is not None else official.get("_name_or_path")

    def publish(target: Path, write) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            write(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_adapter(tmp: Path) -> None:
        config.save_pretrained(tmp)
        save_file(adapter, tmp / "adapter_model.safetensors", metadata={"format": "pt"})

    def write_base(tmp: Path) -> None:
        stock = {k: v for k, v in official.items() if not k.startswith("beacon_") and k != "auto_map"}
        (tmp / "config.json").write_text(json.dumps(stock, indent=2) + "\n")
        base = {k: w.contiguous() for k, w in weights.items() if _adapter_key(k) is None}
        save_file(base, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in COPY_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)

    if base_dir is not None:
        publish(Path(base_dir), write_base)
    publish(Path(adapter_dir), write_adapter)
    return config
