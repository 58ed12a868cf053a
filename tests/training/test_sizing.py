"""`beacon_peft.training.sizing` and recipes/estimate_memory.py: adapter sizes, memory totals and the activation
estimate match docs/training.md and measured allocations."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch
from peft import get_peft_model
from tiny_recipe import ROOT

from beacon_peft import BeaconConfig, training


def test_llama3_8b_adapter_sizes_match_the_docs():
    """The figures of docs/training.md, from the adapter built over a meta-device Llama-3-8B."""
    from beacon_peft.training.sizing import LLAMA3_8B, meta_base, quantized_bytes

    docs = (ROOT / "docs" / "training.md").read_text()
    expected = {None: (788_533_248, 805_310_464), 64: (37_228_544, 37_752_832), 128: (74_452_992, 75_501_568)}
    for rank, (trainable, saved) in expected.items():
        config = BeaconConfig(window=2048, ratios=[2, 4, 8, 16, 32], beacon_rank=rank)
        footprint = training.adapter_footprint(training.meta_model(LLAMA3_8B, config))
        assert (footprint.trainable, footprint.saved) == (trainable, saved), rank
        assert f"{trainable:,}" in docs and f"{saved:,}" in docs
        assert f"{footprint.training_bytes(4, 4, 8):,}" in docs, rank  # fp32 weights + grads + Adam
        assert f"{footprint.file_bytes(2):,}" in docs and f"{footprint.file_bytes(4):,}" in docs
    # per layer: q 4096x4096, k/v 1024x4096 -> rank r deltas r * (4096 + 4096) + 2 * r * (4096 + 1024)
    assert expected[64][1] == 32 * 64 * (8192 + 2 * 5120) + 4096
    assert quantized_bytes(meta_base(LLAMA3_8B)) == (3_489_660_928 + 109_051_904 + 1_703_936, 6_979_321_856)


def test_estimate_memory_recipe_gives_the_documented_totals(capsys):
    spec = importlib.util.spec_from_file_location("beacon_recipes_estimate", ROOT / "recipes" / "estimate_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = (ROOT / "docs" / "training.md").read_text()
    for name, total in (("llama3-8b-pretrain-qlora-lowrank", "15.76"), ("qwen2.5-7b-pretrain-qlora-lowrank", "15.26"),
                        ("llama3-8b-pretrain-qlora", "30.79")):
        result = script.main(["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml")])
        assert f"{result['memory']['total'] / 1e9:.2f}" == total and f"**{total} GB**" in docs, name
    assert "74,452,992 trainable" in capsys.readouterr().out


def test_activation_estimate_matches_measured_allocations():
    """`sizing.activation_bytes` against the bytes a checkpointed training forward leaves allocated (CPU profiler),
    on a small Llama in fp32: the formula behind the 24 GB estimates of docs/training.md."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, LlamaConfig

    from beacon_peft.training.sizing import activation_bytes

    torch.manual_seed(0)
    model_config = LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                               bos_token_id=1, eos_token_id=2)
    for length, window, ratio, scope, group in ((2048, 256, 2, "step-expansion", 16384),
                                                (4096, 512, 8, "step-expansion", 16384),
                                                (4096, 512, 8, "full-coverage", 16384),
                                                (4096, 512, 8, "full-coverage", 1024),
                                                (4096, 512, 8, "step-expansion", 1)):  # the window loop
        config = BeaconConfig(window=window, ratios=[ratio], beacon_rank=4, attention_scope=scope, group_tokens=group)
        base = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, config).train()
        ids = torch.randint(3, 500, (1, length))
        hidden = None  # the previous case's graph is freed here, not inside the next measurement
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            hidden = model.base_model.model.model(input_ids=ids).last_hidden_state  # noqa: F841 (kept alive)
        measured = sum(e.self_cpu_memory_usage for e in prof.key_averages())
        estimate = activation_bytes(model_config, config, length, ratio, 4, 4, 4, 4)["total"]
        assert abs(measured - estimate) < 0.1 * estimate, (length, window, ratio, scope, group, measured, estimate)


def test_attention_working_set_of_the_accelerator_path_is_counted():
    """The masked (accelerator) path copies the memory per window and repeats it per query head: at 128K tokens on
    the 8B shape the repeated K/V are ~68x the memory itself (issue 38, item 5); the CPU's split path copies nothing.
    The figures are docs/training.md's table; `training_memory` counts the recomputed layer's share."""
    from transformers import AutoConfig

    from beacon_peft.training.sizing import LLAMA3_8B, attention_working_set

    shape = AutoConfig.for_model(**LLAMA3_8B)
    config = BeaconConfig(window=1024, ratios=[8])
    masked = attention_working_set(shape, config, 131072, 8)
    M, W, G = 127 * 128, 1152, 16  # compressed entries before the last window, entries per window, windows per pass
    assert masked["memory"] == 2 * 8 * M * 128 * 2
    assert masked["repeated"] == 2 * G * 32 * (M + W) * 128 * 2 and round(masked["repeated"] / 1e9, 2) == 4.56
    assert masked["mask"] == G * W * (M + W) * 2 and masked["repeated"] > 60 * masked["memory"]
    assert masked["peak"] == masked["per_window_copies"] + masked["repeated"] + masked["mask"]
    split = attention_working_set(shape, config, 131072, 8, "split")
    assert split["peak"] < masked["peak"] / 10 and split["peak"] == attention_working_set(shape, config, 2**20, 8,
                                                                                            "split")["peak"]
    docs = (ROOT / "docs" / "training.md").read_text()
    assert "| | 128K | 0.067 GB | 1.14 GB | 4.56 GB | 0.64 GB | 6.35 GB | 0.61 GB |" in docs
    with pytest.raises(ValueError, match="allowed 'masked', 'split'"):
        attention_working_set(shape, config, 131072, 8, "flex")
