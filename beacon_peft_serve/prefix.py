"""A beacon memory as a standard KV prefix: what a plain decoder (the base model alone, vLLM) continues from.

A `BeaconMemory` row holds per layer ``[sink ; compressed ; raw cache]`` at the re-based positions ``0..M-1``
(docs/semantics.md). Sink and raw-cache keys are stored before RoPE, compressed keys after it. The prefix is the
same entries with every key rotated to its position: per layer keys ``(H_kv, M, D)`` after RoPE and values
``(H_kv, M, D)``, at the contiguous positions ``0..M-1``. Nothing of the memory is fed as tokens: the raw cache
already holds the open window's raw tokens as K/V made by the base projections, and its interleaved beacons (made
by the beacon projections) can only be K/V. The question follows as ordinary tokens at positions ``M, M+1, ...``.

Continuing the prefix equals continuing the **sealed** memory (`BeaconMemory.sealed`: the open window takes no
more beacons) for `KVPrefix.exact_tokens` tokens (question and answer together, the answer's last token aside):
the ``window - win_raw`` raw tokens still fitting in the open window, or 0 while a sink is set and nothing is
compressed yet (every chunk then replaces the sink). Past that the beacon model compresses the window and a
plain decoder keeps attending to raw tokens (docs/semantics.md, "A memory as a KV prefix").

`load_prefix` reads a saved memory folder (model-free: `beacon_peft_serve.saved`), `prefix_of` a memory in
process. `describe` reads only the JSON: the prefix's length, exactness and placeholder token ids, which stand for
the prefix in a serving engine's prompt (derived from the memory's checksum, so two memories never share a
prefix-cache block).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import saved
from .rope import apply_rope, rope_tables


@dataclass(frozen=True)
class PrefixInfo:
    """What a saved memory row's prefix is, from its JSON alone (no tensors read)."""

    path: str
    row: int
    sink: int
    comp: int
    raw: int
    exact_tokens: int  # tokens after the prefix computed exactly as the sealed beacon model (see the module)
    memory_id: str  # the saved tensors' sha256: the memory's identity
    base: dict  # the base model's fingerprint (config fields, weights hash)
    signature: dict  # layers, K/V heads, head size, window and ratio settings
    compute_dtype: str

    @property
    def length(self) -> int:
        """M: the prefix's entries (sink + compressed + raw cache)."""
        return self.sink + self.comp + self.raw

    @property
    def vocab_size(self) -> int:
        return int(self.base["config"]["vocab_size"])

    def placeholder_ids(self) -> list[int]:
        """M token ids standing for the prefix in a prompt: a stream of BLAKE2b digests of the memory id and row,
        reduced modulo the vocabulary. Their embeddings are never used (the prefix's K/V replace them); they make
        a serving engine's prefix-cache keys differ between memories."""
        ids: list[int] = []
        counter = 0
        while len(ids) < self.length:
            digest = hashlib.blake2b(f"{self.memory_id}:{self.row}:{counter}".encode(), digest_size=64).digest()
            ids += [int.from_bytes(digest[i : i + 4], "little") % self.vocab_size for i in range(0, 64, 4)]
            counter += 1
        return ids[: self.length]


@dataclass(frozen=True)
class KVPrefix:
    """A memory row as a KV prefix: per layer keys after RoPE and values ``(H_kv, M, D)`` at positions 0..M-1."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    info: Optional[PrefixInfo]  # None for a memory in process (`prefix_of`)
    exact_tokens: int

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)


def _exact_tokens(row: dict, signature: dict) -> int:
    if signature["sink_size"] and int(row["comp"]) == 0:
        return 0  # nothing compressed yet: the next chunk replaces the sink (official semantics)
    return int(signature["window"]) - int(row["win_raw"])


def _check_row(row, batch_size: int) -> None:
    if isinstance(row, bool) or not isinstance(row, int):
        raise TypeError(f"row={row!r} must be an int in [0, {batch_size - 1}], got {type(row).__name__}")
    if not 0 <= row < batch_size:
        raise ValueError(f"row={row} is out of range: allowed [0, {batch_size - 1}]")


def describe(path, row: int = 0) -> PrefixInfo:
    """The `PrefixInfo` of row ``row`` of the memory saved at ``path`` (its JSON checked, tensors not read)."""
    meta = saved.read_meta(path)
    _check_row(row, int(meta["batch_size"]))
    state = meta["rows"][row]
    try:
        sizes = {p: int(state[p]) for p in saved.PARTS}
        exact = _exact_tokens(state, meta["signature"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{Path(path) / saved.META} is corrupt: bad row state ({err!r})") from None
    return PrefixInfo(path=str(path), row=row, **sizes, exact_tokens=exact, memory_id=meta["tensors_sha256"],
                      base=meta["base"], signature=meta["signature"], compute_dtype=meta["compute_dtype"])


def _assemble(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], rotate: Callable) -> tuple[torch.Tensor, ...]:
    """One layer's prefix from its parts (keys (H, T, D): sink and raw before RoPE, comp after): (keys, values)."""
    S, C, R = (parts[p][0].shape[1] for p in saved.PARTS)
    sink_k = rotate(parts["sink"][0], torch.arange(S))
    raw_k = rotate(parts["raw"][0], torch.arange(S + C, S + C + R))
    keys = torch.cat((sink_k, parts["comp"][0], raw_k), dim=1)  # (H, M, D) at positions 0..M-1
    values = torch.cat([parts[p][1] for p in saved.PARTS], dim=1)
    return keys, values


def load_prefix(path, row: int = 0, dtype: Optional[torch.dtype] = None, device=None) -> KVPrefix:
    """The KV prefix of row ``row`` of the memory saved at ``path`` (checked as ``BeaconMemory.load`` checks the
    file; the model is not needed). Keys are rotated with `rope.rope_tables` from the saved base config, in the
    stored dtype; ``dtype``/``device`` then move keys and values."""
    info = describe(path, row)
    meta = saved.read_meta(path)
    tensors = saved.load_tensors(path, meta, saved.PARTS)
    sizes = {"sink": info.sink, "comp": info.comp, "raw": info.raw}
    config, head_dim = info.base["config"], int(info.signature["head_dim"])

    def rotate(k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not len(positions):
            return k
        cos, sin = rope_tables(config, head_dim, positions, k.dtype)
        return apply_rope(k[None], cos, sin)[0]

    keys, values = [], []
    for i in range(int(meta["num_layers"])):
        parts = {p: (tensors[f"layers.{i}.{p}_k"][row, :, : sizes[p]], tensors[f"layers.{i}.{p}_v"][row, :, : sizes[p]])
                 for p in saved.PARTS}
        k, v = _assemble(parts, rotate)
        keys.append(k.to(dtype=dtype or k.dtype, device=device).contiguous())
        values.append(v.to(dtype=dtype or v.dtype, device=device).contiguous())
    return KVPrefix(tuple(keys), tuple(values), info, info.exact_tokens)


def prefix_of(memory, row: int = 0) -> KVPrefix:
    """The KV prefix of row ``row`` of a `beacon_peft.BeaconMemory` in process (keys rotated with the memory's own
    rotary embedding, ``memory.rope``: the model's tables)."""
    _check_row(row, memory.batch_size)
    if not memory.is_initialized:
        raise ValueError("the memory is empty: read some tokens into it first")

    def rotate(k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not len(positions):
            return k
        cos, sin = memory.rope(k[None], positions.to(k.device)[None])
        return apply_rope(k[None], cos, sin)[0]

    keys, values = [], []
    for layer in range(memory.num_layers):
        parts = {p: memory.layer_kv(layer, p, row, pre_rope=False) for p in saved.PARTS}
        k, v = _assemble(parts, rotate)
        keys.append(k)
        values.append(v)
    state = memory.state.rows[row]
    exact = _exact_tokens({"comp": state.comp, "win_raw": state.win_raw}, memory.signature)
    return KVPrefix(tuple(keys), tuple(values), None, exact)
