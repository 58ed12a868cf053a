"""`BeaconMemoryConnector`: a vLLM v1 KV connector that answers from saved beacon memories.

A request names a saved memory in its ``kv_transfer_params`` (``{"beacon_memory": NAME, "beacon_row": ROW}``;
NAME a folder, or a name under ``memory_root`` when the server has one) and its prompt starts with the memory's
placeholder ids (`prefix.PrefixInfo.placeholder_ids`, one per memory entry; `client.completion_request` builds
the body). The connector then tells the scheduler that the first M prompt tokens are available externally, and
before the forward pass writes the memory's KV prefix (keys after RoPE at positions 0..M-1, values) into the
request's blocks with the attention backend's own cache writer (``impl.do_kv_cache_update``), so any backend's
layout is respected. The question's tokens follow at positions M, M+1, ..., computed by the stock model: the
answer is the sealed memory's (docs/semantics.md, "A memory as a KV prefix"; docs/serving.md).

Scheduler side (`get_num_new_matched_tokens`): the memory's JSON is read and checked (format, placeholder ids
in the prompt, layout and base fingerprint against the served model: weights hash of its safetensors folder,
rope settings). A request that fails any check is logged with the reason and failed alone: its prompt is
still announced as external, and the worker reports its blocks as failed loads, which vLLM (with the default
``kv_load_failure_policy="fail"``) finishes with ``finish_reason="error"``; the connector returns the reason in
the response's ``kv_transfer_params`` (``beacon_memory_error``). Other requests go on.

Worker side (`start_load_kv`): loads the memory's tensors (checksum checked again; a small LRU of prefixes keeps
the tensors of recently used memories), slices its heads for tensor parallelism, and writes every layer's K/V.
With prefix caching on, blocks already cached for the same memory (same placeholder ids) are not loaded again;
two memories never share a block (different placeholder ids, and ``cache_salt`` when the client sends it).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .fingerprint import folder_weights_hash
from .prefix import KVPrefix, PrefixInfo, describe, load_prefix
from .rope import rope_parameters

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("beacon_peft_serve")
CACHED_PREFIXES = 4  # memories whose K/V a worker keeps between requests
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Load:
    """One request's load: memory ``path`` row ``row``, prompt positions ``[start, end)``; ``error``: fail it."""

    req_id: str
    path: str
    row: int
    start: int
    end: int
    block_ids: list[int] = field(default_factory=list)
    error: Optional[str] = None


@dataclass
class BeaconMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


class MemoryRefused(ValueError):
    """A request's memory cannot serve it (missing, corrupt, another base, prompt not made for it)."""


class BeaconMemoryConnector(KVConnectorBase_V1):
    """Loads saved beacon memories into requests' KV blocks (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        root = extra.get("memory_root")
        self._root = Path(root).resolve() if root else None
        self._block_size = vllm_config.cache_config.block_size
        self._model_config = vllm_config.model_config
        # scheduler side
        self._pending: dict[str, Load] = {}  # allocated this step, sent with the next metadata
        self._announced: dict[str, Load] = {}  # announced by get_num_new_matched_tokens, not yet allocated
        self._errors: dict[str, str] = {}  # request id -> reason, returned when it finishes
        self._weights_hash: dict[str, str] = {}  # compute dtype -> weights hash of the served folder
        # worker side
        self._prefixes: OrderedDict[tuple, KVPrefix] = OrderedDict()
        self._failed_blocks: set[int] = set()

    # --- scheduler side -----------------------------------------------------------------------------------
    def _resolve(self, name: str) -> Path:
        if not isinstance(name, str) or not name:
            raise MemoryRefused(f"beacon_memory={name!r} must be a non-empty string naming a saved memory")
        if self._root is None:
            return Path(name)
        path = (self._root / name).resolve()
        if path != self._root and self._root not in path.parents:
            raise MemoryRefused(f"beacon_memory={name!r} lies outside the server's memory root")
        return path

    def _model_dir(self) -> Path:
        model = Path(self._model_config.model)
        if model.is_dir():
            return model
        from huggingface_hub import snapshot_download  # the served model came from the local Hub cache

        return Path(snapshot_download(self._model_config.model, local_files_only=True))

    def _check_base(self, info: PrefixInfo) -> None:
        """The memory was made on the served base: layout, rope settings and the weights hash."""
        mc, sig = self._model_config, info.signature
        served = {"num_layers": mc.hf_text_config.num_hidden_layers,
                  "num_key_value_heads": mc.get_total_num_kv_heads(), "head_dim": mc.get_head_size()}
        odd = [f"{k}: memory {sig.get(k)!r} vs served {v!r}" for k, v in served.items() if sig.get(k) != v]
        model_dir = self._model_dir()
        config = json.loads((model_dir / "config.json").read_text())
        config = config.get("text_config", config)
        mine, theirs = rope_parameters(info.base["config"]), rope_parameters(config)
        if mine != theirs:
            odd.append(f"rope: memory {mine} vs served {theirs}")
        if not odd:
            dtype = info.compute_dtype
            if dtype not in self._weights_hash:
                self._weights_hash[dtype] = folder_weights_hash(model_dir, getattr(torch, dtype))
            if self._weights_hash[dtype] != info.base["weights"]:
                odd.append(f"weights: memory {info.base['weights']} vs served {self._weights_hash[dtype]} "
                           f"({model_dir})")
        if odd:
            raise MemoryRefused(f"the memory at {info.path} was made on another base model: " + "; ".join(odd))

    def _check(self, request: "Request", params: dict) -> PrefixInfo:
        row = params.get("beacon_row", 0)
        try:
            info = describe(self._resolve(params["beacon_memory"]), row)
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise MemoryRefused(str(err)) from None
        self._check_base(info)
        prompt = list(request.prompt_token_ids or [])
        if len(prompt) <= info.length:
            raise MemoryRefused(f"the prompt has {len(prompt)} tokens: it must hold the memory's {info.length} "
                                "placeholder ids and at least one question token (beacon_peft_serve.client)")
        if prompt[: info.length] != info.placeholder_ids():
            raise MemoryRefused(f"the prompt does not start with the placeholder ids of the memory at {info.path} "
                                "(build it with beacon_peft_serve.client.completion_request)")
        if info.exact_tokens < len(prompt) - info.length:
            logger.warning("request %s: its question has %d tokens, the memory's open window %d: past it the "
                           "served answer attends to raw tokens where the beacon model would compress",
                           request.request_id, len(prompt) - info.length, info.exact_tokens)
        return info

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if "beacon_memory" not in params:
            return 0, False
        req_id = request.request_id
        try:
            info = self._check(request, params)
            path, row, end = info.path, info.row, info.length
        except MemoryRefused as err:
            logger.error("request %s refused: %s", req_id, err)
            self._errors[req_id] = str(err)
            path, row, end = "", 0, len(request.prompt_token_ids or []) - 1  # failed at load: its blocks fail
        if end <= num_computed_tokens:
            return 0, False  # cached already (same placeholder ids: the same memory), or nothing to fail
        self._announced[req_id] = Load(req_id, path, row, num_computed_tokens, end, error=self._errors.get(req_id))
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        load = self._announced.pop(request.request_id, None)
        if load is not None and num_external_tokens > 0:
            load.start = load.end - num_external_tokens
            self._pending[request.request_id] = load

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = BeaconMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            load = self._pending.pop(new.req_id, None)
            if load is not None:
                load.block_ids = list(new.block_ids[0])
                meta.loads.append(load)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            load = self._pending.pop(req_id, None)
            if load is not None and req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                load.block_ids = list(cached.new_block_ids[i][0])  # a resumed request: all its blocks
                meta.loads.append(load)
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        self._announced.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        error = self._errors.pop(request.request_id, None)
        return False, ({"beacon_memory_error": error} if error else None)

    # --- worker side --------------------------------------------------------------------------------------
    def _prefix(self, load: Load) -> KVPrefix:
        key = (load.path, load.row)
        prefix = self._prefixes.get(key)
        if prefix is not None and describe(load.path, load.row).memory_id == prefix.info.memory_id:
            self._prefixes.move_to_end(key)
            return prefix
        prefix = load_prefix(load.path, load.row)
        self._prefixes[key] = prefix
        while len(self._prefixes) > CACHED_PREFIXES:
            self._prefixes.popitem(last=False)
        return prefix

    def _slots(self, load: Load, device) -> torch.Tensor:
        positions = torch.arange(load.start, load.end)
        blocks = torch.tensor(load.block_ids, dtype=torch.long)[positions // self._block_size]
        return (blocks * self._block_size + positions % self._block_size).to(device)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, BeaconMetadata)
        if not meta.loads:
            return
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        layers = {name: layer for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")}
        for load in meta.loads:
            first, last = load.start // self._block_size, (load.end - 1) // self._block_size
            if load.error is not None:
                self._failed_blocks.update(load.block_ids[first : last + 1])
                continue
            try:
                prefix = self._prefix(load)
            except (FileNotFoundError, ValueError) as err:  # changed on disk since the scheduler's check
                logger.error("request %s: loading the memory failed: %s", load.req_id, err)
                self._failed_blocks.update(load.block_ids[first : last + 1])
                continue
            for name, layer in layers.items():
                match = _LAYER_INDEX.search(name)
                index = int(match.group(1))
                k = prefix.keys[index][:, load.start : load.end]  # (H_kv, T, D)
                v = prefix.values[index][:, load.start : load.end]
                heads = k.shape[0] // world
                if world > 1:  # this rank's K/V heads
                    k, v = k[rank * heads : (rank + 1) * heads], v[rank * heads : (rank + 1) * heads]
                cache = layer.kv_cache
                dtype = self._model_config.dtype
                k = k.transpose(0, 1).to(device=cache.device, dtype=dtype).contiguous()  # (T, H_kv, D)
                v = v.transpose(0, 1).to(device=cache.device, dtype=dtype).contiguous()
                layer.impl.do_kv_cache_update(layer, k, v, cache, self._slots(load, cache.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
