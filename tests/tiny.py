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

# Decoders served through the general mechanisms of `beacon_peft.anatomy` / `support` (issue 41): model_type ->
# config overrides that make the tiny model exercise the mechanism (tests/test_architectures.py)
OPENED_ARCHS = {
    "gemma2": {},  # attention logit soft-capping; sliding layers alternate with global ones
    "gemma3_text": {"num_hidden_layers": 6, "sliding_window": 512},  # RoPE per layer type (5 local, 1 global)
    "olmo3": {"num_hidden_layers": 4},  # RoPE per layer type; whole-projection q/k norms
    "smollm3": {"num_hidden_layers": 4},  # every 4th layer without RoPE (NoPE)
    "exaone4": {"num_hidden_layers": 4, "sliding_window": 512},  # global layers without RoPE; q/k norms
    "cohere2": {"num_hidden_layers": 4},  # global layers without RoPE; interleaved RoPE
    "cohere": {"use_qk_norm": True},  # interleaved RoPE; a query/key LayerNorm with one (H, D) weight row per head
    "glm": {},  # interleaved, partial RoPE
    "ernie4_5": {},  # interleaved RoPE in float32
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2},  # half-width rotary tables, attention sinks
    "phi3": {},  # fused qkv_proj, [q | k | v] blocks
    "gpt_neox": {"num_key_value_heads": 4},  # fused query_key_value, per head [q_h | k_h | v_h]; partial RoPE
    "phi": {},  # `dense` output projection, partial RoPE
    "hunyuan_v1_dense": {"head_dim": 16},  # query_layernorm / key_layernorm, applied after RoPE
}


def tiny_auto(model_type: str, attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of any transformers ``model_type`` (COMMON's sizes; ``overrides`` go to the config's
    constructor, so fields derived from others, such as per-layer lists, follow them)."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def perturb_norms(model: torch.nn.Module, std: float = 0.3, seed: int = 2) -> torch.nn.Module:
    """Give every norm weight and attention sink distinct values (they start as ones or zeros, under which a norm
    commutes with RoPE and a sink hides), so the tests see where a model applies them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("sinks"):
                param.add_(torch.randn(param.shape, generator=gen) * std)
    return model


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
