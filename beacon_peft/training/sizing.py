"""Parameter counts and memory estimates of a beacon run, from a meta-device model (no weights, no GPU).

`meta_model` builds the base from its transformers config on the ``meta`` device and wraps it with the adapter, so
the counts are the adapter's own (which parameters exist, which are trainable: the last layer's beacon query and
output projections are frozen, as they never reach the loss). The rest are formulas:

* `quantized_bytes`: nf4 weights (4 bits) + one 8-bit absmax per 64 weights + (nested) one fp32 scale per 256 of
  those, as bitsandbytes stores them.
* `activation_bytes`: what training keeps for the backward pass of one sequence with gradient checkpointing: the
  input of every decoder layer for every entry (raw tokens and beacons), the compressed K/V memory at the end of
  every group of windows (one decoder pass each, ``group_tokens``), and the attention masks. Checked against
  measured allocations on a small model in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import BeaconConfig
from ..metrics import head_dim

# Meta-Llama-3-8B(-Instruct) config.json: 32 layers, hidden 4096, q 4096x4096, k/v 1024x4096 (8 KV heads)
LLAMA3_8B: dict[str, Any] = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False,
)
# Qwen2.5-7B(-Instruct): 28 layers, hidden 3584, q 3584x3584, k/v 512x3584 (4 KV heads), q/k/v biases, 32K positions
QWEN2_5_7B: dict[str, Any] = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
    bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
)
# shapes of the recipes' models, for estimates without the hub (model_name_or_path -> config fields)
PRESETS = {"meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B, "meta-llama/Meta-Llama-3-8B": LLAMA3_8B,
           "Qwen/Qwen2.5-7B-Instruct": QWEN2_5_7B, "Qwen/Qwen2.5-7B": QWEN2_5_7B}


def meta_base(model_config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The base model built on the meta device from ``model_config`` (a transformers config, or a dict of its
    fields with ``model_type``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_config, dict):
        fields = dict(model_config)
        model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def meta_model(model_config, beacon_config: BeaconConfig, dtype: torch.dtype = torch.bfloat16):
    """``get_peft_model(meta_base(model_config), beacon_config)``: the adapter's real parameters, on meta."""
    from peft import get_peft_model

    return get_peft_model(meta_base(model_config, dtype), beacon_config)


@dataclass
class AdapterFootprint:
    """Parameter counts of a beacon adapter."""

    trainable: int  # get gradients and optimizer states (beacon projections + beacon embedding)
    saved: int  # in adapter_model.safetensors: also the frozen last-layer beacon q (and o)

    @property
    def frozen(self) -> int:
        return self.saved - self.trainable

    def file_bytes(self, bytes_per_param: int) -> int:
        """Tensor bytes of ``adapter_model.safetensors`` (plus a header of a few KB)."""
        return self.saved * bytes_per_param

    def training_bytes(self, weight: int = 4, grad: int = 4, adam: int = 8) -> int:
        """Trainable weights + their gradients + Adam's two moments, plus the frozen adapter weights."""
        return self.trainable * (weight + grad + adam) + self.frozen * weight


def adapter_footprint(model: nn.Module, adapter_name: str = "default") -> AdapterFootprint:
    """Count the adapter parameters of a `PeftModel` holding a beacon adapter (on any device, meta included)."""
    from peft import get_peft_model_state_dict

    saved = sum(t.numel() for t in get_peft_model_state_dict(model, adapter_name=adapter_name).values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return AdapterFootprint(trainable=trainable, saved=saved)


def quantized_bytes(base: nn.Module, nested: bool = True) -> tuple[int, int]:
    """(bytes of the decoder-layer Linear weights in bitsandbytes nf4, number of those weights)."""
    decoder = base.get_decoder()
    n = sum(m.weight.numel() for layer in decoder.layers for m in layer.modules() if isinstance(m, nn.Linear))
    blocks = n // 64
    scales = blocks + (blocks // 256) * 4 if nested else blocks * 4  # 8-bit absmax + fp32 second level, or fp32
    return n // 2 + scales, n


def activation_bytes(model_config, config: BeaconConfig, length: int, ratio: int, hidden_bytes: int = 2,
                     key_bytes: int = 2, value_bytes: int = 2, mask_bytes: int = 2) -> dict[str, int]:
    """Bytes kept for backward by one training sequence of ``length`` tokens at ``ratio``, with checkpointing.

    ``hidden_bytes``: bytes per element of the residual stream (4 when the embeddings are fp32, as after
    `peft.prepare_model_for_kbit_training`; 2 in bf16). ``key_bytes``: 4 when the rotary tables are fp32 (they
    follow the embeddings' dtype). Interleaved placement, one sequence, no sink. Windows go through the decoder in
    groups of ``config.group_tokens`` input tokens: every group leaves the compressed memory at its end (the next
    group's input), and the attention masks of its windows (one per window step when beacons see part of their
    window, one per group of windows otherwise).
    """
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    kv_dim = model_config.num_key_value_heads * head_dim(model_config)
    beacons = config.window // ratio  # per window
    chunk = config.window + beacons  # entries of one window step
    steps = -(-length // config.window)
    entries = length + (length // config.window) * beacons
    # inputs of every layer, the last layer's output and the final norm's output, for every entry; the output
    hidden_states = entries * (layers + 2) * hidden * hidden_bytes + 2 * length * hidden * hidden_bytes
    per_group = max(1, config.pass_tokens("cuda") // config.window)  # window steps per pass on a GPU
    ends = list(range(per_group, steps, per_group)) + [steps]  # windows completed at the end of each group
    # each group leaves the compressed memory of the windows before its end (the last window gets no beacons)
    compressed = sum(min(end, steps - 1) * beacons for end in ends) * layers * kv_dim * (key_bytes + value_bytes)
    if config.scoped or per_group == 1:
        masks = sum(chunk * ((i - 1) * beacons + chunk) for i in range(1, steps + 1)) * mask_bytes
    else:  # one mask per group of windows: each window over the group's memory and itself
        starts = [0] + ends[:-1]
        masks = sum((end - start) * chunk * (min(end, steps - 1) * beacons + chunk)
                    for start, end in zip(starts, ends)) * mask_bytes
    return {"hidden_states": hidden_states, "compressed_memory": compressed, "masks": masks,
            "total": hidden_states + compressed + masks}


def attention_working_set(model_config, config: BeaconConfig, length: int, ratio: int, path: str = "masked",
                          element_bytes: int = 2, mask_bytes: int = 2) -> dict[str, int]:
    """Bytes one layer's attention allocates in the last decoder pass of a ``length``-token sequence (computed).

    The last pass holds ``G = group_tokens / window`` windows (an accelerator's budget) of ``W = window + window /
    ratio`` entries and reads a memory of ``M`` compressed entries. ``path``:

    * ``"masked"`` (an accelerator's batch of windows, `layer.BeaconAttention._attend_windows`): the memory is
      copied once per window next to its own entries (``per_window_copies``: 2 x G x kv_heads x (M + W) x D), then
      repeated per query head for the memory-efficient kernel (``repeated``: 2 x G x heads x (M + W) x D), with an
      additive mask of G x W x (M + W); ``peak`` counts all three at once (an upper bound);
    * ``"split"`` (the CPU's inference path, `layer._split_windows`): flash calls over views of the memory, nothing
      copied; its working set is the windows' outputs and their log-sum-exp merge in float32 (``outputs``).

    ``memory`` is what the layer's compressed K/V memory itself holds, for comparison."""
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    D = head_dim(model_config)
    beacons = config.window // ratio
    W = config.window + beacons
    steps = -(-length // config.window)
    G = min(steps, max(1, config.pass_tokens("cuda") // config.window)) if not config.scoped else 1
    M = (steps - 1) * beacons  # the compressed entries before the last window (which a training call leaves raw)
    out = {"memory": 2 * kv_heads * M * D * element_bytes}
    if path == "masked":
        copies = 2 * G * kv_heads * (M + W) * D * element_bytes
        repeated = 2 * G * heads * (M + W) * D * element_bytes if heads > kv_heads else 0
        mask = G * W * (M + W) * mask_bytes
        out.update(per_window_copies=copies, repeated=repeated, mask=mask, peak=copies + repeated + mask)
    elif path == "split":
        outputs = 2 * G * heads * W * (D + 1) * 4
        out.update(outputs=outputs, peak=outputs)
    else:
        raise ValueError(f"path={path!r} is not an attention path: allowed 'masked', 'split'")
    return out


def training_memory(model_config, config: BeaconConfig, length: int, ratio: int, upcast_unquantized: bool = True,
                    trainable_bytes: int = 4, adam_bytes: int = 8) -> dict[str, int]:
    """Estimated GPU bytes of a QLoRA-style run (4-bit nf4 base with nested quantization, bf16 autocast, checkpointing,
    batch 1): frozen base, adapter (weights + grads + Adam), and `activation_bytes` of one ``length`` sequence at
    ``ratio``, and the attention of the one layer being recomputed in the backward (`attention_working_set`'s
    masked path, the accelerator's, with the gradients of its repeated keys and values). Excludes the CUDA context,
    the allocator's slack and the rest of that layer's working set (its MLP activations)."""
    base = meta_base(model_config)
    quantized, n_quantized = quantized_bytes(base)
    unquantized = sum(p.numel() for p in base.parameters()) - n_quantized
    model = meta_model(model_config, config)
    footprint = adapter_footprint(model)
    wide = 4 if upcast_unquantized else 2
    acts = activation_bytes(base.config, config, length, ratio, hidden_bytes=wide, key_bytes=wide,
                            value_bytes=2, mask_bytes=wide)
    out = {"base_4bit": quantized, "base_unquantized": unquantized * wide,
           "adapter": footprint.training_bytes(trainable_bytes, trainable_bytes, adam_bytes),
           **{f"activations_{k}": v for k, v in acts.items() if k != "total"}}
    attention = attention_working_set(base.config, config, length, ratio, "masked")
    out["attention_recompute"] = attention["peak"] + attention["repeated"] + attention["per_window_copies"]
    out["total"] = sum(out.values())
    return out
