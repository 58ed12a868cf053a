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

This module is the format alone (`write_memory`, `read_memory`: plain tensors and JSON, every check);
`memory.BeaconMemory.save` / `.load` turn a memory into that data and back. The model-free part of reading (JSON,
checksum, tensor names and shapes) lives in `beacon_peft_serve.saved`, so a server without the training stack reads
the same format with the same checks.

No pickle anywhere. Saving writes a temporary sibling folder and renames it into place, so a crash leaves either
the previous memory or the new one, never a half-written one; a non-empty folder that is not a saved memory is
refused before any work. Loading checks the JSON, the checksum, the tensor names and shapes, then the fingerprints
and settings against the model, and raises a ValueError naming whatever differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from beacon_peft_serve.saved import (  # noqa: F401  (the model-free reading, shared with the serving side)
    FORMAT,
    META,
    TENSORS,
    VERSION,
    is_saved_memory,
    load_tensors,
    read_meta,
    sha256,
)

from .atomic import write_dir
from .fingerprint import differences

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_target(path: Path) -> None:
    """Refuse a target that is a file, or a non-empty folder that is not a saved memory (before any work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder: a memory is saved as a folder")
    if path.is_dir() and any(path.iterdir()) and not is_saved_memory(path):
        raise ValueError(f"{path} is a non-empty folder that is not a saved memory: refusing to overwrite it "
                         "(choose an empty or new folder)")


def check_storage_dtype(dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype} is not a storage dtype: allowed {[str(d) for d in STORAGE_DTYPES]} or None")


def write_memory(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a memory's ``tensors`` (CPU, contiguous) and ``meta`` (JSON-able; format, version and the tensors'
    checksum are added) to the folder ``path``, atomically; see the module docstring for the layout."""
    path = Path(path)
    check_target(path)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS))
        full = {"format": FORMAT, "version": VERSION, **meta, "tensors_sha256": sha256(tmp / TENSORS)}
        (tmp / META).write_text(json.dumps(full, indent=1) + "\n")

    return write_dir(path, write, overwrite=True)  # `check_target` refused anything but an earlier memory


def read_memory(path, expected: dict, parts: tuple[str, ...]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The meta and tensors of the memory saved at ``path``, checked: the JSON, the description of the model
    that made it against ``expected`` (signature, base and adapter fingerprints, compute dtype, forced ratio), the
    checksum, and every tensor's name and shape (``parts``: the memory parts, e.g. sink, comp, raw)."""
    path = Path(path)
    meta = read_meta(path)
    problems = []
    for key in ("signature", "base", "adapter"):
        problems += [f"{key}.{line}" for line in differences(meta[key], expected[key])]
    if meta["compute_dtype"] != expected["compute_dtype"]:
        problems.append(f"compute dtype: memory {meta['compute_dtype']} vs model {expected['compute_dtype']}")
    if meta.get("ratio_override") != expected["ratio_override"]:
        problems.append(f"forced compression ratio: memory {meta.get('ratio_override')!r} vs model "
                        f"{expected['ratio_override']!r} (call model.base_model.set_compression_ratio("
                        f"{meta.get('ratio_override')!r}) before loading)")
    if problems:
        raise ValueError(f"the memory at {path} was made by another model, adapter or setting: " + "; ".join(problems))

    return meta, load_tensors(path, meta, parts)
