"""Fingerprints of a base model and a beacon adapter, so a saved memory is only ever continued by the model that
made it.

A memory's K/V are activations of one base model read through one adapter (its beacon projections and embedding
made the compressed entries), at one window / stride / compression-ratio setting. Continuing it with anything
else gives plausible-looking nonsense, so `memory_file` stores these fingerprints and compares them on load.

Both are cheap (well under a second for SmolLM2-135M): the config fields that shape activations, every tensor's
name, shape and dtype, and a strided sample of at most `SAMPLE` elements of every tensor, hashed with BLAKE2b.
Any retraining or a different checkpoint changes the sampled elements; a change confined to unsampled elements
would go unnoticed (the price of not hashing hundreds of MB at every save and load).
"""

from __future__ import annotations

import json

from torch import nn

from beacon_peft_serve.fingerprint import SAMPLE, hash_tensors  # noqa: F401  (one implementation, light)

BASE_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                      "rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps", "tie_word_embeddings")
ADAPTER_CONFIG_FIELDS = ("window", "stride", "ratios", "ratio_mix", "placement", "attention_scope", "attend_prev",
                         "sink_size", "beacon_projections", "embed_init", "beacon_layers", "beacon_rank")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def base_fingerprint(model: nn.Module) -> dict:
    """The base causal LM (adapter tensors excluded): shaping config fields and a hash of its weights, under the
    base model's own tensor names (PEFT's ``.base_layer`` wrapper level removed), so the hash is the one of the
    plain base model and of its safetensors folder (`beacon_peft_serve.fingerprint.folder_weights_hash`)."""
    config = model.config
    fields = {k: _jsonable(getattr(config, k, None)) for k in BASE_CONFIG_FIELDS}
    named = [(n.replace(".base_layer.", "."), p) for n, p in model.state_dict().items() if "beacon_" not in n]
    return {"config": fields, "weights": hash_tensors(named)}


def adapter_fingerprint(tuner: nn.Module, adapter: str) -> dict:
    """The active beacon adapter: its settings and a hash of its weights (beacon projections and embedding)."""
    config = tuner.peft_config[adapter]
    fields = {k: _jsonable(getattr(config, k, None)) for k in ADAPTER_CONFIG_FIELDS}
    suffix = f".{adapter}"
    named = [(n, p) for n, p in tuner.named_parameters()
             if "beacon_" in n and (n.endswith(suffix) or f"{suffix}." in n)]
    return {"name": adapter, "config": fields, "weights": hash_tensors(named)}


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Readable ``key: saved X vs model Y`` lines for every leaf that differs (``weights`` hashes included)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: memory {a!r} vs model {b!r}")
    return out
