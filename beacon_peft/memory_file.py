"""A `BeaconMemory` on disk: a folder with ``memory.safetensors`` (the K/V) and ``memory.json`` (everything else).

Reading a long document is the expensive part of Activation Beacon inference; the memory it leaves (sink +
beacons of every completed window + the raw cache of the open window) is small (about ``1/r`` of a full KV
cache). Saved, it lets another process continue the document exactly where the reading stopped.

Layout of ``DIR/``:

* ``memory.safetensors``: per layer ``i`` the six tensors ``layers.{i}.{sink,comp,raw}_{k,v}``, each
  ``(B, H_kv, T, D)`` right-padded across rows (sink and raw keys before RoPE, compressed keys after RoPE, as in
  memory), plus ``raw_is_beacon`` (B, R) uint8 and ``raw_local`` (B, R) int64: the kind and window-local index of
  every raw-cache entry.
* ``memory.json``: ``format`` (``"beacon-memory"``) and ``version``; ``rows`` (every `RowState` field per row),
  ``columns``, ``sequence_ratio``, ``ratio_log``, ``step_log``; the memory ``signature`` (layers, K/V heads,
  head size, window, stride, ratios, sink, placement, scope); ``compute_dtype`` (the model's) and
  ``storage_dtype`` (the tensors'); ``ratio_override`` (the ratio forced with ``set_compression_ratio``);
  ``base`` and ``adapter`` fingerprints (`fingerprint`); ``tensors_sha256`` of ``memory.safetensors``.

No pickle anywhere. Saving writes a temporary sibling folder and renames it into place, so a crash leaves either
the previous memory or the new one, never a half-written one; a non-empty folder that is not a saved memory is
refused before any work. Loading checks the JSON, the checksum, the tensor names and shapes, then the fingerprints
and settings against the model, and raises a ValueError naming whatever differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import write_dir
from .fingerprint import adapter_fingerprint, base_fingerprint, differences
from .memory import PARTS, BeaconMemory, LayerMemory, MemoryState, RowState

FORMAT = "beacon-memory"
VERSION = 1
TENSORS = "memory.safetensors"
META = "memory.json"
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _parts(model):
    """(tuner, decoder, adapter) of a PEFT model holding a beacon adapter, or of its `BeaconModel`."""
    from .model import BeaconModel

    tuner = getattr(model, "base_model", None) if not isinstance(model, BeaconModel) else model
    if not isinstance(tuner, BeaconModel):
        raise TypeError(f"model must be a PEFT model with a beacon adapter (or its BeaconModel), got "
                        f"{type(model).__name__}")
    adapter = tuner.active_beacon_adapter()
    if adapter is None:
        raise ValueError("the beacon adapter is disabled: a memory is made and read with the adapter active")
    return tuner, BeaconModel._decoder(tuner.model), adapter


def model_description(model) -> dict:
    """What a memory must agree on with ``model``: signature, fingerprints, compute dtype, forced ratio."""
    from .forward import memory_signature

    tuner, decoder, adapter = _parts(model)
    return {
        "signature": memory_signature(decoder, tuner.peft_config[adapter]),
        "base": base_fingerprint(tuner.model),
        "adapter": adapter_fingerprint(tuner, adapter),
        "compute_dtype": str(decoder.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "ratio_override": tuner.ratio_picker(adapter).override,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_saved_memory(path: Path) -> bool:
    """Whether ``path`` is a folder written by `save_memory` (its JSON names the format)."""
    try:
        return json.loads((Path(path) / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder: a memory is saved as a folder")
    if path.is_dir() and any(path.iterdir()) and not is_saved_memory(path):
        raise ValueError(f"{path} is a non-empty folder that is not a saved memory: refusing to overwrite it "
                         "(choose an empty or new folder)")


def save_memory(memory: BeaconMemory, path, model, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``memory`` (made by ``model``) to the folder ``path``; see the module docstring for the layout."""
    if not isinstance(memory, BeaconMemory):
        raise TypeError(f"memory must be a BeaconMemory, got {type(memory).__name__}")
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype} is not a storage dtype: allowed {[str(d) for d in STORAGE_DTYPES]} or None")
    path = Path(path)
    _check_target(path)
    description = model_description(model)
    if memory.signature and memory.signature != description["signature"]:
        shown = differences(memory.signature, description["signature"])
        raise ValueError(f"this memory was not made by this model/adapter setting: {'; '.join(shown)}")
    if not memory.is_initialized:
        raise ValueError("the memory is empty: read some tokens into it first")

    st = memory.state
    tensors = {}
    for i, lm in enumerate(st.layers):
        if lm is None:
            raise ValueError(f"layer {i} of the memory holds nothing: it was not made by a complete forward call")
        for part in PARTS:
            for kv in "kv":
                t = getattr(lm, f"{part}_{kv}").detach()
                tensors[f"layers.{i}.{part}_{kv}"] = (t.to(dtype) if dtype is not None else t).to("cpu").contiguous()
    tensors["raw_is_beacon"] = torch.from_numpy(st.raw_is_beacon.astype(np.uint8))
    tensors["raw_local"] = torch.from_numpy(st.raw_local.astype(np.int64))
    stored = tensors["layers.0.sink_k"].dtype

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS))
        meta = {
            "format": FORMAT, "version": VERSION,
            "num_layers": memory.num_layers, "batch_size": memory.batch_size,
            "rows": [asdict(r) for r in st.rows],
            "columns": st.columns, "sequence_ratio": st.sequence_ratio,
            "ratio_log": list(st.ratio_log), "step_log": [[list(t) for t in step] for step in st.step_log],
            "signature": description["signature"],
            "compute_dtype": description["compute_dtype"], "storage_dtype": str(stored).removeprefix("torch."),
            "ratio_override": description["ratio_override"],
            "base": description["base"], "adapter": description["adapter"],
            "tensors_sha256": _sha256(tmp / TENSORS),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")

    return write_dir(path, write, overwrite=True)  # `_check_target` refused anything but an earlier memory


def _read_meta(path: Path) -> dict:
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
                         f"{VERSION}")
    needed = ("num_layers", "batch_size", "rows", "columns", "ratio_log", "step_log", "signature", "compute_dtype",
              "storage_dtype", "base", "adapter", "tensors_sha256")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise ValueError(f"{path / META} is corrupt: missing {missing}")
    return meta


def load_memory(path, model) -> BeaconMemory:
    """Read the memory saved at ``path`` for ``model``; see the module docstring for what is checked."""
    path = Path(path)
    meta = _read_meta(path)
    tuner, decoder, adapter = _parts(model)
    current = model_description(model)
    problems = []
    for key in ("signature", "base", "adapter"):
        problems += [f"{key}.{line}" for line in differences(meta[key], current[key])]
    if meta["compute_dtype"] != current["compute_dtype"]:
        problems.append(f"compute dtype: memory {meta['compute_dtype']} vs model {current['compute_dtype']}")
    if meta.get("ratio_override") != current["ratio_override"]:
        problems.append(f"forced compression ratio: memory {meta.get('ratio_override')!r} vs model "
                        f"{current['ratio_override']!r} (call model.base_model.set_compression_ratio("
                        f"{meta.get('ratio_override')!r}) before loading)")
    if problems:
        raise ValueError(f"the memory at {path} was made by another model, adapter or setting: " + "; ".join(problems))

    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise ValueError(f"{path} is corrupt: {TENSORS} is missing")
    if _sha256(tensor_file) != meta["tensors_sha256"]:
        raise ValueError(f"{tensor_file} is corrupt or truncated: its checksum differs from the one saved")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{tensor_file} is corrupt or truncated ({err})") from None

    L, B = meta["num_layers"], meta["batch_size"]
    expected = {f"layers.{i}.{p}_{kv}" for i in range(L) for p in PARTS for kv in "kv"} | {"raw_is_beacon", "raw_local"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[:6]
        raise ValueError(f"{tensor_file} is corrupt: tensors {odd} missing or unexpected")
    try:
        rows = [RowState(**r) for r in meta["rows"]]
    except TypeError as err:
        raise ValueError(f"{path / META} is corrupt: bad row state ({err})") from None
    if len(rows) != B:
        raise ValueError(f"{path / META} is corrupt: {len(rows)} row states for batch size {B}")
    device = decoder.get_input_embeddings().weight.device
    dtype = decoder.get_input_embeddings().weight.dtype
    sig = meta["signature"]
    layers = []
    for i in range(L):
        parts = [tensors[f"layers.{i}.{p}_{kv}"] for p in PARTS for kv in "kv"]
        for (p, kv), t, length in zip([(p, kv) for p in PARTS for kv in "kv"], parts,
                                      [max((getattr(r, p) for r in rows), default=0) for p in PARTS for _ in "kv"]):
            shape_ok = (t.dim() == 4 and t.shape[0] == B and t.shape[1] == sig["num_key_value_heads"]
                        and t.shape[3] == sig["head_dim"] and t.shape[2] >= length)
            if not shape_ok:
                raise ValueError(f"{tensor_file} is corrupt: layers.{i}.{p}_{kv} has shape {tuple(t.shape)}")
        layers.append(LayerMemory(*(t.to(device=device, dtype=dtype) for t in parts)))
    memory = BeaconMemory(L, B, decoder.rotary_emb, device, signature=sig)
    memory.state = MemoryState(
        rows=rows, layers=layers,
        raw_is_beacon=tensors["raw_is_beacon"].numpy().astype(bool),  # host bookkeeping
        raw_local=tensors["raw_local"].numpy().astype(np.int64),
        columns=int(meta["columns"]), sequence_ratio=meta.get("sequence_ratio"),
        ratio_log=[int(r) for r in meta["ratio_log"]],
        step_log=[[tuple(t) for t in step] for step in meta["step_log"]],
    )
    return memory


ROW_FIELDS = tuple(f.name for f in fields(RowState))
