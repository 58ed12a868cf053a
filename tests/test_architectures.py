"""Decoders beyond the four the suite is built on: those the beacon loop serves compute what the base does with
compression off and continue a memory as one call; those it would run wrongly are refused when the adapter is
injected (`beacon_peft.support`), with the base model left as it was."""

import pytest
import torch
from peft import get_peft_model
from tiny import COMMON, random_ids
from transformers import AutoConfig, AutoModelForCausalLM

from beacon_peft import BeaconConfig
from beacon_peft.layer import BeaconAttention
from beacon_peft.reuse import cache_kwargs

W = 16


def tiny(model_type: str, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


SERVED = ["gemma", "olmo", "olmo2", "granite", "mixtral", "qwen3_moe", "starcoder2"]


@pytest.mark.parametrize("model_type", SERVED)
def test_other_llama_family_decoders_match_the_base_and_continue_a_memory_exactly(model_type):
    ids = random_ids(1, 4 * W + 5)
    base = tiny(model_type)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(tiny(model_type), BeaconConfig(window=W, ratios=[0, 4]))
    model.base_model.set_compression_ratio(0)
    with torch.no_grad():
        # equal up to float32 summation order (Granite's multipliers make its logits the largest here)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        model.base_model.set_compression_ratio(4)
        whole = model(input_ids=ids).logits
        first = model(input_ids=ids[:, : 2 * W + 3])
        rest = model(input_ids=ids[:, 2 * W + 3 :], **cache_kwargs(model, first.past_key_values)).logits
    assert not torch.allclose(whole, expected, atol=1e-3)  # compressed: no longer the base's logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, atol=1e-5, rtol=1e-5)


REFUSED = [
    ("gemma2", {}, "soft-caps the logits"),
    ("gemma3_text", {}, "different RoPE per layer type"),
    ("cohere", {}, "rotate-half convention"),
    ("stablelm", {}, "without passing its keyword arguments on"),
    ("bitnet", {}, "attn_sub_norm"),
    ("smollm3", {"num_hidden_layers": 4}, "NoPE"),
    ("starcoder2", {"residual_dropout": 0.1}, "residual_dropout=0.1"),
]


@pytest.mark.parametrize("model_type,overrides,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_decoders_the_loop_would_run_wrongly_are_refused_and_left_as_they_were(model_type, overrides, reason):
    model = tiny(model_type, **overrides)
    ids = random_ids(1, 2 * W)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    forward = model.model.forward
    with pytest.raises(TypeError, match=reason):
        get_peft_model(model, BeaconConfig(window=W, ratios=[4]))
    assert not any(isinstance(m, BeaconAttention) for m in model.modules())
    assert model.model.forward == forward
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("token_id", [128, 5000, -1])
def test_beacon_embedding_token_outside_the_vocabulary_is_refused(token_id):
    model = tiny("llama", eos_token_id=token_id)
    with pytest.raises(ValueError, match=rf"eos_token_id={token_id}.*allowed \[0, 127\]"):
        get_peft_model(model, BeaconConfig(window=W, ratios=[4]))
    assert not any(isinstance(m, BeaconAttention) for m in model.modules())


def test_router_logits_cannot_be_asked_of_a_compressed_mixture_of_experts():
    model = get_peft_model(tiny("mixtral"), BeaconConfig(window=W, ratios=[4]))
    ids = random_ids(1, 2 * W)
    with pytest.raises(ValueError, match="output_router_logits=True is not supported"):
        model(input_ids=ids, output_router_logits=True)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # the default (False): a plain causal LM loss
    assert torch.isfinite(out.loss)
