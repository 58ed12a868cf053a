"""Decoders beyond the four the suite is built on: those the beacon loop serves compute what the base does with
compression off and continue a memory as one call; those it would run wrongly are refused when the adapter is
injected (`beacon_peft.support`), with the base model left as it was."""

import pytest
import torch
from peft import get_peft_model
from tiny import MORE_ARCHS, random_ids, tiny_auto

from beacon_peft import BeaconConfig
from beacon_peft.layer import BeaconAttention
from beacon_peft.reuse import cache_kwargs

W = 16
SERVED = list(MORE_ARCHS)



@pytest.mark.parametrize("model_type", SERVED)
def test_other_llama_family_decoders_match_the_base_and_continue_a_memory_exactly(model_type):
    ids = random_ids(1, 4 * W + 5)
    base = tiny_auto(model_type)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(tiny_auto(model_type), BeaconConfig(window=W, ratios=[0, 4]))
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


@pytest.mark.parametrize("model_type", SERVED)
def test_other_decoders_train_only_the_beacon_parameters(model_type):
    model = get_peft_model(tiny_auto(model_type), BeaconConfig(window=W, ratios=[4]))
    model.train()
    ids = random_ids(2, 3 * W + 2)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("beacon_" in name for name in grads)  # the frozen base (experts, routers too) gets none
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "beacon_k" in name)  # the memory's keys learn


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
    model = tiny_auto(model_type, **overrides)
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
    model = tiny_auto("llama", eos_token_id=token_id)
    with pytest.raises(ValueError, match=rf"eos_token_id={token_id}.*allowed \[0, 127\]"):
        get_peft_model(model, BeaconConfig(window=W, ratios=[4]))
    assert not any(isinstance(m, BeaconAttention) for m in model.modules())


def test_router_logits_cannot_be_asked_of_a_compressed_mixture_of_experts():
    model = get_peft_model(tiny_auto("mixtral"), BeaconConfig(window=W, ratios=[4]))
    ids = random_ids(1, 2 * W)
    with pytest.raises(ValueError, match="output_router_logits=True is not supported"):
        model(input_ids=ids, output_router_logits=True)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # the default (False): a plain causal LM loss
    assert torch.isfinite(out.loss)


def test_a_bfloat16_base_whose_rotary_tables_are_float32_keeps_its_dtype():
    """OLMo's rotary embedding hands out float32 cos/sin whatever the model's dtype; the model rotates in float32 and
    casts back, and so must the beacon attention (a bf16 base with the adapter in float32 failed in the matmul)."""
    ids = random_ids(1, 4 * W + 5)
    base = tiny_auto("olmo").to(torch.bfloat16)
    with torch.no_grad():
        expected = base(input_ids=ids).logits.float()
    model = get_peft_model(tiny_auto("olmo").to(torch.bfloat16), BeaconConfig(window=W, ratios=[0, 4]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the recipes' layout: bf16 base, fp32 adapter
    model.base_model.set_compression_ratio(0)
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        model.base_model.set_compression_ratio(4)
        compressed = model(input_ids=ids).logits
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()  # bf16 rounding only
    assert compressed.dtype == torch.bfloat16 and torch.isfinite(compressed).all()
