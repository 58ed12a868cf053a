"""A saved beacon memory folder, read without a model: its format, its checksum and the structure of its tensors.

The layout is described in `beacon_peft.memory_file` (which writes it and, with a model at hand, also compares
the fingerprints and settings): ``memory.json`` and ``memory.safetensors``. This module is the model-free part
of reading it, shared by `beacon_peft.memory_file` and the serving side (`beacon_peft_serve.prefix`), so a
server refuses exactly what ``BeaconMemory.load`` refuses for a truncated, corrupt or foreign-format folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

FORMAT = "beacon-memory"
# 2: the base fingerprint hashes the base model's own tensor names (PEFT's `.base_layer` level removed) and rows
# may carry `bare` (a training-mode window); a version-1 memory is refused by its version, not as "another base"
VERSION = 2
TENSORS = "memory.safetensors"
META = "memory.json"
PARTS = ("sink", "comp", "raw")  # attention sink, compressed memory (the beacons' K/V), raw cache of the open window
NEEDED = ("num_layers", "batch_size", "rows", "columns", "ratio_log", "step_log", "signature", "compute_dtype",
          "storage_dtype", "base", "adapter", "tensors_sha256")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_saved_memory(path) -> bool:
    """Whether ``path`` is a folder written by ``BeaconMemory.save`` (its JSON names the format)."""
    try:
        return json.loads((Path(path) / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_meta(path) -> dict:
    """The checked ``memory.json`` of the memory folder ``path`` (FileNotFoundError when there is none; ValueError
    for a file, a missing or corrupt JSON, another format or version, or missing fields)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved memory at {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: a saved memory is a folder holding {META} and {TENSORS}")
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a saved memory: {META} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / META} is corrupt or truncated ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path / META} is not a saved beacon memory (format {found!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} holds memory format version {meta.get('version')!r}; this beacon_peft reads "
                         f"{VERSION} (read the document again and save its memory)")
    missing = [k for k in NEEDED if k not in meta]
    if missing:
        raise ValueError(f"{path / META} is corrupt: missing {missing}")
    return meta


def load_tensors(path, meta: dict, parts: tuple[str, ...] = PARTS) -> dict[str, torch.Tensor]:
    """The tensors of the memory folder ``path`` whose checked meta is ``meta``: the checksum, then every tensor's
    name and shape against the meta (``parts``: the memory parts). ValueError names what is wrong."""
    path = Path(path)
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise ValueError(f"{path} is corrupt: {TENSORS} is missing")
    if sha256(tensor_file) != meta["tensors_sha256"]:
        raise ValueError(f"{tensor_file} is corrupt or truncated: its checksum differs from the one saved")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{tensor_file} is corrupt or truncated ({err})") from None

    L, B = meta["num_layers"], meta["batch_size"]
    expected_names = {f"layers.{i}.{p}_{kv}" for i in range(L) for p in parts for kv in "kv"}
    if set(tensors) != expected_names | {"raw_is_beacon", "raw_local"}:
        odd = sorted(set(tensors) ^ (expected_names | {"raw_is_beacon", "raw_local"}))[:6]
        raise ValueError(f"{tensor_file} is corrupt: tensors {odd} missing or unexpected")
    rows = meta["rows"]
    if not isinstance(rows, list) or len(rows) != B:
        raise ValueError(f"{path / META} is corrupt: {len(rows) if isinstance(rows, list) else rows!r} row states "
                         f"for batch size {B}")
    try:
        lengths = {p: max((int(r[p]) for r in rows), default=0) for p in parts}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / META} is corrupt: bad row state ({err!r})") from None
    sig = meta["signature"]
    for i in range(L):
        for p in parts:
            for kv in "kv":
                t = tensors[f"layers.{i}.{p}_{kv}"]
                shape_ok = (t.dim() == 4 and t.shape[0] == B and t.shape[1] == sig["num_key_value_heads"]
                            and t.shape[3] == sig["head_dim"] and t.shape[2] >= lengths[p])
                if not shape_ok:
                    raise ValueError(f"{tensor_file} is corrupt: layers.{i}.{p}_{kv} has shape {tuple(t.shape)}")
    return tensors
