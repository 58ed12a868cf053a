"""Convert an official Activation Beacon checkpoint (FlagOpen/FlagEmbedding, research/Long_LLM/activation_beacon)
into a standard PEFT adapter folder, and optionally into a stock transformers base-model folder.

An official folder holds a ``config.json`` with ``beacon_*`` fields and weights that include
``model.beacon_embed_tokens.weight`` and ``model.layers.{i}.self_attn.beacon_{q,k,v,o}_proj.{weight,bias}``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_dir
from .config import BeaconConfig

PathLike = Union[str, os.PathLike]
EMBED_KEY = "model.beacon_embed_tokens.weight"
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


def read_official_config(path: Path) -> dict:
    """The JSON object of an official ``config.json``: ValueError naming the file (and where the JSON breaks) when
    it is not valid JSON or not an object."""
    try:
        official = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): allowed a JSON object (the model config with its "
                         "beacon_* fields)") from None
    if not isinstance(official, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(official),
                                                                                                  "null")
        raise ValueError(f"{path} holds a JSON {kind}, not an object: allowed a JSON object "
                         "(the model config with its beacon_* fields)")
    return official


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


def _nested(a: Path, b: Path) -> bool:
    """True when resolved paths ``a`` and ``b`` are equal or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def check_output(name: str, target: PathLike, src: Path, overwrite: bool) -> None:
    """Refuse an output folder that would destroy anything the user did not ask to replace.

    Never allowed: the source itself, a folder inside it or one holding it (replacing it would delete the
    source), or a path that is a file. Without ``overwrite``: a folder that is not empty.
    """
    out, source = Path(target).resolve(), src.resolve()
    if _nested(out, source):
        where = "is" if out == source else ("lies inside" if source in out.parents else "contains")
        raise ValueError(f"{name}={str(target)!r} {where} the source checkpoint {str(src)!r}: allowed a folder "
                         "outside the source (the source is never modified)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name}={str(target)!r} is an existing file: allowed a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        count = sum(1 for _ in out.iterdir())
        raise ValueError(f"{name}={str(target)!r} is not empty ({count} entries): allowed a new or empty folder; "
                         "pass --overwrite (overwrite=True) to replace it")


def check_outputs(src: Path, adapter_dir: PathLike, base_dir: Optional[PathLike], overwrite: bool) -> None:
    """`check_output` for both outputs, which must also be distinct and not nested in each other."""
    check_output("out", adapter_dir, src, overwrite)
    if base_dir is None:
        return
    check_output("base_out", base_dir, src, overwrite)
    if _nested(Path(adapter_dir).resolve(), Path(base_dir).resolve()):
        raise ValueError(f"base_out={str(base_dir)!r} and out={str(adapter_dir)!r} overlap: allowed two separate "
                         "folders")


def convert_official(src_dir: PathLike, adapter_dir: PathLike, base_dir: Optional[PathLike] = None,
                     overwrite: bool = False) -> BeaconConfig:
    """Write a PEFT adapter folder (and, with ``base_dir``, a stock base-model folder) from an official one.

    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)`` then reproduces
    the official model. Each folder is written to a temporary sibling and moved into place at the end, so a
    failure never leaves a half-written folder. An output folder must be new or empty unless ``overwrite``; it
    may never be the source, lie inside it or hold it (the source is never modified). Returns the adapter's
    `BeaconConfig`.
    """
    src = Path(src_dir)
    check_outputs(src, adapter_dir, base_dir, overwrite)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json: pass an official Activation Beacon checkpoint folder")
    official = read_official_config(src / "config.json")
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
        write_dir(base_dir, write_base, overwrite=overwrite)
    write_dir(adapter_dir, write_adapter, overwrite=overwrite)
    return config
