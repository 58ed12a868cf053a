"""Tiny random decoder models built from configs (no downloads), one per supported architecture."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,
    tie_word_embeddings=False,
)

ARCHS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_theta=10000.0),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=False),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32, use_sliding_window=False),
}


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = "eager", **overrides) -> torch.nn.Module:
    """A tiny random model of ``arch``; ``overrides`` replace config fields (e.g. ``intermediate_size``)."""
    torch.manual_seed(seed)
    config = ARCHS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":  # Qwen2 has q/k/v biases: make them non-zero so the beacon copies matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.eval()


# Further Llama-family decoders the beacon loop serves (tests/test_architectures.py; the GPU smoke check)
MORE_ARCHS = ("gemma", "olmo", "olmo2", "granite", "mixtral", "qwen3_moe", "starcoder2")


def tiny_auto(model_type: str, attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of any transformers ``model_type`` (COMMON's sizes; ``overrides`` go to the config's
    constructor, so fields derived from others, such as per-layer lists, follow them)."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def perturb_beacons(peft_model, std: float = 0.05, seed: int = 1) -> None:
    """Make the beacon parameters differ from the base copies they start as."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "beacon_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * std)


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)
