"""The weights hash that ties a saved memory to its base model, from a module's tensors or a safetensors folder.

`hash_tensors` is the one implementation (`beacon_peft.fingerprint` builds its base and adapter fingerprints on
it): BLAKE2b over every tensor's name, shape, dtype and an evenly strided sample of at most `SAMPLE` elements.
`folder_weights_hash` computes the base fingerprint's ``weights`` field from a model folder's safetensors files
(what a server holds: vLLM loads the same files into its own fused layout), as ``model.state_dict()`` of the
transformers model loaded in ``dtype`` would give it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

SAMPLE = 4096  # elements sampled (evenly strided) from every tensor


def _sample_bytes(t: torch.Tensor) -> bytes:
    """Bytes of an evenly strided sample of ``t`` (at most `SAMPLE` elements), as float32 when floating point, so
    the same weights fingerprint alike whatever the dtype they are loaded in is not hidden: the dtype is hashed
    separately."""
    flat = t.detach().reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[:: flat.numel() // SAMPLE][:SAMPLE]
    flat = flat.to("cpu")
    if flat.dtype.is_floating_point:
        flat = flat.float()
    elif flat.dtype not in (torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool):
        flat = flat.view(torch.uint8)
    return flat.contiguous().numpy().tobytes()


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """BLAKE2b (16 bytes, hex) over every tensor's name, shape, dtype and strided sample."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_sample_bytes(t))
    return h.hexdigest()


def folder_weights_hash(model_dir, dtype: torch.dtype) -> str:
    """`hash_tensors` over the safetensors files of ``model_dir``, floating tensors cast to ``dtype`` (the dtype the
    memory's model computed in), with ``lm_head.weight`` added as the input embedding when the config ties them
    and the files leave it out (``state_dict()`` of a tied model lists both names). Reads one tensor at a time."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors file: the base model's weights cannot be fingerprinted")
    config = json.loads((model_dir / "config.json").read_text())
    sampled: dict[str, tuple[tuple, bytes]] = {}  # name -> (shape, sample bytes): never the whole model at once
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype.is_floating_point:
                    t = t.to(dtype)
                sampled[name] = (tuple(t.shape), str(t.dtype), _sample_bytes(t))
    if "lm_head.weight" not in sampled and config.get("tie_word_embeddings", True):
        embed = [n for n in sampled if n.endswith("embed_tokens.weight")]
        if len(embed) == 1:
            sampled["lm_head.weight"] = sampled[embed[0]]
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(sampled):
        shape, dt, sample = sampled[name]
        h.update(f"{name}|{shape}|{dt}|".encode())
        h.update(sample)
    return h.hexdigest()
