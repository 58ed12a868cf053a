"""`BeaconMemory`: the compressed KV memory of one sequence batch, returned as ``past_key_values``.

Per layer the memory holds three parts, each a right-padded ``(B, H_kv, T, D)`` tensor with per-row lengths:

* ``sink``: the first ``sink_size`` activations (keys before RoPE),
* ``comp``: the beacons of every completed window (keys after RoPE, at the position they keep forever; with
  compression off, ratio 0, the raw activations of completed windows),
* ``raw``: every activation (raw tokens and beacons) of the open window processed so far (keys before RoPE).

Positions are re-based onto the memory: sink entry ``i`` sits at ``i``, compressed entry ``j`` at
``sink + j``, raw-cache entry ``i`` at ``sink + comp + i``, and the next chunk continues from there. Rows of a
batch keep their own lengths, so left-padded rows are scheduled over their own tokens.

The object is a `transformers.Cache`, so ``generate`` carries it from step to step; every call that is not
handed one starts from an empty memory. A call works on a copy of the bookkeeping and commits it only when it
succeeds, so a failing call leaves a memory passed in untouched.

This file holds the memory's layout and its transitions: `MemoryUpdate` (planned once per step by
`schedule.Scheduler`) is applied by every layer to its `LayerMemory` and the step's keys/values.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from transformers.cache_utils import Cache

from . import memory_file, metrics
from .fingerprint import adapter_fingerprint, base_fingerprint, differences
from .rope import apply_rope, unapply_rope

PARTS = ("sink", "comp", "raw")  # attention sink, compressed memory (the beacons' K/V), raw cache


@dataclass
class LayerMemory:
    """K/V of one layer: sink and raw keys before RoPE, compressed keys after RoPE. Shapes (B, H_kv, T, D)."""

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    comp_k: torch.Tensor
    comp_v: torch.Tensor
    raw_k: torch.Tensor
    raw_v: torch.Tensor

    @classmethod
    def empty_like(cls, k: torch.Tensor, v: torch.Tensor) -> "LayerMemory":
        """Zero-length parts shaped after a chunk's keys ``k`` (B, H_kv, L, D) and values ``v``: new tensors, not
        views, so that a memory never keeps the storage of the (group-long) tensors it was cut from."""
        ek, ev = _empty(k), _empty(v)
        return cls(ek, ev, ek, ev, ek, ev)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.sink_k, self.sink_v, self.comp_k, self.comp_v, self.raw_k, self.raw_v)


class Take(enum.Enum):
    """How a memory part is rebuilt from ``cat(old part, step entries)`` when every row does the same thing."""

    KEEP = "keep"  # the old part, unchanged
    CAT = "cat"  # the old part followed by every step entry
    EMPTY = "empty"  # nothing


Selection = Union[Take, torch.Tensor]  # a `Take`, or a (B, T) gather index into cat(old part, step entries)


def select_entries(a: torch.Tensor, b: torch.Tensor, how: Selection, dim: int = 2) -> torch.Tensor:
    """Entries of ``cat(a, b)`` along ``dim`` as ``how`` says. K/V (B, H, T, D) with ``dim=2``; per-row
    metadata (B, T) with ``dim=1``. Always out of place: a memory tensor is never written."""
    if how is Take.KEEP:
        return a
    if how is Take.CAT:
        return torch.cat((a, b), dim=dim)
    if how is Take.EMPTY:
        return a if a.shape[dim] == 0 else _empty(a, dim)
    src = torch.cat((a, b), dim=dim)
    if dim == 1:  # metadata (B, T)
        return src.gather(1, how)
    index = how[:, None, :, None].expand(src.shape[0], src.shape[1], how.shape[1], src.shape[3])
    return src.gather(2, index)  # (B, H, T, D)


def _empty(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """A zero-length tensor shaped like ``x`` but for ``dim``, with storage of its own."""
    return x.new_empty(x.shape[:dim] + (0,) + x.shape[dim + 1 :])


@dataclass(frozen=True)
class MemoryUpdate:
    """The memory transition of one step, the same for every layer (planned by `schedule.Scheduler`).

    ``sink``/``raw`` select the new sink and raw cache out of ``cat(old part, step entries)``. When a window
    completes, ``comp_new`` picks the entries of ``cat(raw cache, step entries)`` that enter the compressed
    memory (its beacons, or with ratio 0 its leaving raw tokens); they are rotated once to the positions they keep
    and ``comp`` compacts ``cat(compressed, new)``.
    """

    sink: Selection
    raw: Selection
    comp_new: Optional[torch.Tensor] = None  # (B, K) gather index; None: no window completes in this step
    comp: Selection = Take.KEEP

    def apply(self, mem: "LayerMemory", k: torch.Tensor, v: torch.Tensor,
              comp_rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> "LayerMemory":
        """The layer's memory after the step. ``k``/``v`` (B, Hkv, L, D): the step's keys (before RoPE) and values;
        ``comp_rope``: the (cos, sin) tables (B, K, D) of the positions the new compressed entries keep."""
        comp_k, comp_v = mem.comp_k, mem.comp_v
        if self.comp_new is not None:
            new_k = select_entries(mem.raw_k, k, self.comp_new)  # (B, Hkv, K, D) before RoPE
            new_v = select_entries(mem.raw_v, v, self.comp_new)
            new_k = apply_rope(new_k, *comp_rope)  # rotated once, at the position it keeps
            comp_k = select_entries(comp_k, new_k, self.comp)
            comp_v = select_entries(comp_v, new_v, self.comp)
        return LayerMemory(
            sink_k=select_entries(mem.sink_k, k, self.sink),
            sink_v=select_entries(mem.sink_v, v, self.sink),
            comp_k=comp_k,
            comp_v=comp_v,
            raw_k=select_entries(mem.raw_k, k, self.raw),
            raw_v=select_entries(mem.raw_v, v, self.raw),
        )


@dataclass
class RowState:
    """Bookkeeping of one batch row (plain ints, no tensors)."""

    win_raw: int = 0  # raw tokens of the open window processed so far (overlap included)
    rem: int = 0  # interleave: raw tokens of the open window not yet followed by a beacon
    ratio: Optional[int] = None  # compression ratio of the open window (None: not chosen yet)
    sink: int = 0  # sink entries
    comp: int = 0  # compressed entries
    raw: int = 0  # raw-cache entries
    windows: int = 0  # completed windows
    tokens: int = 0  # raw tokens consumed since the memory was created
    bare: int = 0  # interleave: raw tokens of the open window read without their beacons (a training call's last
    #                window, official semantics): such a memory cannot be continued (`Scheduler._check_continuable`)


@dataclass
class MemoryState:
    """Everything a forward call advances; copied at call start, committed at call end."""

    rows: list[RowState]
    layers: list[Optional[LayerMemory]]
    raw_is_beacon: np.ndarray  # (B, R) bool, on the host: raw-cache entry is a beacon
    raw_local: np.ndarray  # (B, R) int64, on the host: window-local index (raw token i or beacon j)
    columns: int = 0  # input columns consumed (padding included): what `get_seq_length` reports
    sequence_ratio: Optional[int] = None  # ratio drawn once per sequence (instance-random / adapt)
    ratio_log: list[int] = field(default_factory=list)  # ratio of every window step, in order
    # per step, per row: (chunk entries, memory entries before it, beacons in it)
    step_log: list[list[tuple[int, int, int]]] = field(default_factory=list)

    def copy(self) -> "MemoryState":
        return MemoryState(
            rows=[copy.copy(r) for r in self.rows],
            layers=list(self.layers),
            raw_is_beacon=self.raw_is_beacon,
            raw_local=self.raw_local,
            columns=self.columns,
            sequence_ratio=self.sequence_ratio,
            ratio_log=list(self.ratio_log),
            step_log=list(self.step_log),
        )


def memory_signature(decoder: torch.nn.Module, config) -> dict:
    """What a memory must agree on with the model and adapter that continue it: the layout of its K/V (layers,
    K/V heads, head size) and the settings that define its positions and windows."""
    cfg = decoder.config
    return {
        "num_layers": cfg.num_hidden_layers,
        "num_key_value_heads": metrics.kv_heads(cfg),
        "head_dim": metrics.head_dim(cfg),
        "window": config.window,
        "stride": config.stride,
        "ratios": list(config.ratios),
        "sink_size": config.sink_size,
        "placement": config.placement,
        "attention_scope": config.attention_scope,
    }


def describe_owner(model) -> tuple[dict, torch.nn.Module]:
    """What a saved memory records of the model that makes or reads it (signature, base and adapter fingerprints,
    compute dtype, forced ratio), and that model's decoder. ``model``: a PEFT model holding a beacon adapter, or
    its tuner (`model.BeaconModel`, read through its methods: this module sits below it)."""
    tuner = model if hasattr(model, "active_beacon_adapter") else getattr(model, "base_model", None)
    if not hasattr(tuner, "active_beacon_adapter"):
        raise TypeError(f"model must be a PEFT model with a beacon adapter (or its BeaconModel), got "
                        f"{type(model).__name__}")
    adapter = tuner.active_beacon_adapter()
    if adapter is None:
        raise ValueError("the beacon adapter is disabled: a memory is made and read with the adapter active")
    decoder = tuner.model.get_decoder()
    description = {
        "signature": memory_signature(decoder, tuner.peft_config[adapter]),
        "base": base_fingerprint(tuner.model),
        "adapter": adapter_fingerprint(tuner, adapter),
        "compute_dtype": str(decoder.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "ratio_override": tuner.ratio_picker(adapter).override,
    }
    return description, decoder


class BeaconMemory(Cache):
    """Activation Beacon memory for a batch: ``[sink ; compressed beacons ; raw cache]`` per layer.

    Read it with `sizes`, `num_entries`, `nbytes` and `layer_kv`; continue a sequence by passing it back as
    ``past_key_values``. Users never reset it: a call without it starts from a fresh one.
    """

    is_compileable = False

    def __init__(self, num_layers: int, batch_size: int, rope: Callable, device=None,
                 signature: Optional[dict] = None):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.signature = dict(signature or {})  # model layout and adapter settings it was made with
        self._batch_size = batch_size
        self._rope = rope  # positions (B, T) -> (cos, sin) of the base model's rotary embedding
        self.state = MemoryState(
            rows=[RowState() for _ in range(batch_size)],
            layers=[None] * num_layers,
            raw_is_beacon=np.zeros((batch_size, 0), dtype=bool),  # raw-cache metadata lives on the host
            raw_local=np.zeros((batch_size, 0), dtype=np.int64),
        )

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # --- reading -------------------------------------------------------------------------------------------
    def _check_index(self, name: str, value, count: int) -> None:
        """``value`` must be an int in ``[0, count - 1]`` (no negative indexing: it would silently pick a row)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r} must be an int in [0, {count - 1}], got {type(value).__name__}")
        if not 0 <= value < count:
            raise ValueError(f"{name}={value} is out of range: allowed [0, {count - 1}]")

    def sizes(self, row: int = 0) -> dict[str, int]:
        """Entries held for ``row``: ``{"sink", "comp", "raw", "total", "tokens"}``."""
        self._check_index("row", row, self.batch_size)
        r = self.state.rows[row]
        return {"sink": r.sink, "comp": r.comp, "raw": r.raw, "total": r.sink + r.comp + r.raw, "tokens": r.tokens}

    def num_entries(self) -> list[int]:
        """Memory entries per row (sink + compressed + raw cache): the KV length a next token attends to."""
        return [r.sink + r.comp + r.raw for r in self.state.rows]

    @property
    def ratios_used(self) -> list[int]:
        """Compression ratio of every window step so far, in order."""
        return list(self.state.ratio_log)

    def steps(self, row: int = 0) -> list[dict[str, int]]:
        """Every forward step of ``row`` so far: chunk entries, memory entries before it, beacons in it."""
        self._check_index("row", row, self.batch_size)
        return [
            {"input_len": entries, "mem_size": mem, "beacon_size": beacons}
            for step in self.state.step_log
            for entries, mem, beacons in [step[row]]
            if entries
        ]

    def kv_tensors(self) -> list[torch.Tensor]:
        """Every K/V tensor held: sink, compressed and raw-cache keys and values of every layer."""
        return [t for lm in self.state.layers if lm is not None for t in lm.tensors()]

    def nbytes(self) -> int:
        """Bytes of every K/V tensor held (all layers, padding included): what the memory really occupies."""
        return sum(t.numel() * t.element_size() for t in self.kv_tensors())

    def layer_kv(self, layer: int, part: str, row: int = 0, pre_rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(H_kv, T, D)`` of one part (``"sink"``, ``"comp"``, ``"raw"``) of a row.

        Keys are returned before RoPE (compressed keys are un-rotated from their stored positions). ``"beacon"``, a
        second name for ``"comp"``, is deprecated (removed in 0.2).
        """
        if part not in PARTS + ("beacon",):
            raise ValueError(f"part={part!r} is not allowed: choose one of {list(PARTS)}")
        if part == "beacon":
            warnings.warn("layer_kv(part='beacon') is deprecated and will be removed in beacon_peft 0.2: the "
                          "compressed memory (the beacons' keys and values) is part 'comp'", FutureWarning,
                          stacklevel=2)
            part = "comp"
        self._check_index("layer", layer, self.num_layers)
        self._check_index("row", row, self.batch_size)
        lm = self.state.layers[layer]
        length = getattr(self.state.rows[row], part)
        if lm is None:
            return torch.zeros(0), torch.zeros(0)
        k = getattr(lm, f"{part}_k")[row : row + 1, :, :length]
        v = getattr(lm, f"{part}_v")[row, :, :length]
        if part == "comp" and pre_rope and length:
            sink = self.state.rows[row].sink
            positions = torch.arange(sink, sink + length, device=k.device)[None]
            cos, sin = self._rope(k, positions)
            k = unapply_rope(k, cos, sin)
        return k[0], v

    # --- the transformers.Cache interface used by generate ---------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns consumed so far (generate slices the next input with it)."""
        return self.state.columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_linear(self) -> list[bool]:
        """One False per layer. The base `Cache` reads this from its (here empty) `layers`, and an empty list reads
        as "every layer is a linear-attention state": generate() then skips slicing a restarted prompt to its new
        tokens and the whole prompt would be appended to the memory a second time."""
        return [False] * self.num_layers

    @property
    def is_initialized(self) -> bool:
        return any(lm is not None for lm in self.state.layers)

    def reset(self) -> None:
        raise NotImplementedError("A BeaconMemory is never reset: call the model without past_key_values instead.")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("Compressed memory cannot be cropped (assisted decoding is not supported).")

    def _select_rows(self, index: torch.Tensor) -> None:
        st = self.state
        idx = index.tolist()
        st.rows = [copy.copy(st.rows[i]) for i in idx]
        st.layers = [
            None if lm is None else LayerMemory(*(t.index_select(0, index.to(t.device)) for t in lm.tensors()))
            for lm in st.layers
        ]
        st.raw_is_beacon = st.raw_is_beacon[idx]
        st.raw_local = st.raw_local[idx]
        self._batch_size = len(idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    # --- reuse: forks, files ----------------------------------------------------------------------------------
    def copy(self) -> "BeaconMemory":
        """A fork: an independent memory holding the same sink, beacons and raw cache.

        Cheap: the K/V tensors are shared, only the bookkeeping (`MemoryState`: row counters, logs) is copied.
        Sharing is safe because nothing ever writes into a memory tensor: every step builds the next memory out of
        place (``torch.cat``/``gather`` in `select_entries`, RoPE applied out of place) and a call assigns
        its new state to the memory it continued. Continuing the fork (``model(..., past_key_values=fork)``,
        ``generate``) therefore never changes this memory, nor this memory the fork.
        """
        fork = BeaconMemory(self.num_layers, self._batch_size, self._rope, signature=self.signature)
        fork.state = self.state.copy()
        return fork

    def sealed(self) -> "BeaconMemory":
        """A fork whose open windows take no more beacons: the rest of each row's open window is read uncompressed
        (ratio 0 for that window), so tokens continuing the memory are plain raw tokens at positions ``M, M+1, ...``
        attending causally to every memory entry. This is what a plain decoder continuing from the memory as a KV
        prefix computes (`beacon_peft_serve.prefix`), exactly, for the ``window - win_raw`` raw tokens that still fit
        in the open window (docs/semantics.md, "A memory as a KV prefix"). Windows after it compress as usual."""
        fork = self.copy()
        for row in fork.state.rows:
            row.ratio = 0  # the open window's ratio: 0 = no beacons; the next window draws its own
        return fork

    @property
    def rope(self) -> Callable:
        """The base model's rotary embedding (``rope(x, position_ids) -> (cos, sin)``) the sink and raw-cache keys
        are rotated with at every step."""
        return self._rope

    def save(self, path, model, dtype: Optional[torch.dtype] = None) -> None:
        """Write the memory to the folder ``path`` (safetensors + JSON, no pickle), atomically.

        ``model`` is the PEFT model (or its `BeaconModel`) that made the memory: its base model, active adapter and
        dtype are fingerprinted so that `load` refuses any other. ``dtype`` stores the K/V in another floating
        dtype (``torch.bfloat16`` halves an fp32 memory; loading casts back to the model's dtype). See
        `beacon_peft.memory_file`.
        """
        memory_file.check_storage_dtype(dtype)
        memory_file.check_target(Path(path))
        description, _ = describe_owner(model)
        if self.signature and self.signature != description["signature"]:
            shown = differences(self.signature, description["signature"])
            raise ValueError(f"this memory was not made by this model/adapter setting: {'; '.join(shown)}")
        if not self.is_initialized:
            raise ValueError("the memory is empty: read some tokens into it first")
        st = self.state
        tensors = {}
        for i, lm in enumerate(st.layers):
            if lm is None:
                raise ValueError(f"layer {i} of the memory holds nothing: it was not made by a complete forward call")
            for part in PARTS:
                for kv in "kv":
                    t = getattr(lm, f"{part}_{kv}").detach()
                    t = t.to(dtype) if dtype is not None else t
                    tensors[f"layers.{i}.{part}_{kv}"] = t.to("cpu").contiguous()
        tensors["raw_is_beacon"] = torch.from_numpy(st.raw_is_beacon.astype(np.uint8))
        tensors["raw_local"] = torch.from_numpy(st.raw_local.astype(np.int64))
        meta = {
            "num_layers": self.num_layers, "batch_size": self.batch_size,
            "rows": [dataclasses.asdict(r) for r in st.rows],
            "columns": st.columns, "sequence_ratio": st.sequence_ratio,
            "ratio_log": list(st.ratio_log), "step_log": [[list(t) for t in step] for step in st.step_log],
            "signature": description["signature"], "compute_dtype": description["compute_dtype"],
            "storage_dtype": str(tensors["layers.0.sink_k"].dtype).removeprefix("torch."),
            "ratio_override": description["ratio_override"],
            "base": description["base"], "adapter": description["adapter"],
        }
        memory_file.write_memory(path, tensors, meta)

    @classmethod
    def load(cls, path, model) -> "BeaconMemory":
        """Read a memory written by `save`, for ``model``; a ValueError names whatever differs (base model,
        adapter, window/ratio settings, layers, dtype) and a truncated or corrupt file is refused."""
        description, decoder = describe_owner(model)
        meta, tensors = memory_file.read_memory(path, description, PARTS)
        try:
            rows = [RowState(**r) for r in meta["rows"]]
        except TypeError as err:
            raise ValueError(f"{Path(path) / memory_file.META} is corrupt: bad row state ({err})") from None
        weight = decoder.get_input_embeddings().weight
        L, B = meta["num_layers"], meta["batch_size"]
        layers = [LayerMemory(*(tensors[f"layers.{i}.{p}_{kv}"].to(device=weight.device, dtype=weight.dtype)
                                for p in PARTS for kv in "kv")) for i in range(L)]
        memory = cls(L, B, decoder.rotary_emb, weight.device, signature=meta["signature"])
        memory.state = MemoryState(
            rows=rows, layers=layers,
            raw_is_beacon=tensors["raw_is_beacon"].numpy().astype(bool),  # host bookkeeping
            raw_local=tensors["raw_local"].numpy().astype(np.int64),
            columns=int(meta["columns"]), sequence_ratio=meta.get("sequence_ratio"),
            ratio_log=[int(r) for r in meta["ratio_log"]],
            step_log=[[tuple(t) for t in step] for step in meta["step_log"]],
        )
        return memory

    def __repr__(self) -> str:
        rows = ", ".join(f"{s['sink']}+{s['comp']}+{s['raw']}" for s in (self.sizes(i) for i in range(self.batch_size)))
        return f"BeaconMemory(layers={self.num_layers}, rows=[{rows}] (sink+compressed+raw), bytes={self.nbytes()})"
