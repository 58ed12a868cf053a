"""Decoders beyond the four the suite is built on: those the beacon loop serves compute what the base does with
compression off, continue a memory as one call, equal the window loop when grouped, save and load, and train only the
beacon parameters; those it would run wrongly are refused when the adapter is injected (`beacon_peft.support`),
with the base model left as it was."""

import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import MORE_ARCHS, OPENED_ARCHS, perturb_beacons, perturb_norms, random_ids, tiny_auto

from beacon_peft import BeaconConfig
from beacon_peft.layer import BeaconAttention
from beacon_peft.reuse import cache_kwargs
from beacon_peft.rope import LayerRope

W = 16
SERVED = [(m, {}) for m in MORE_ARCHS] + list(OPENED_ARCHS.items())
IDS = [m for m, _ in SERVED]


def _tiny(model_type: str, overrides: dict, **kw) -> torch.nn.Module:
    return perturb_norms(tiny_auto(model_type, **overrides, **kw))


@pytest.mark.parametrize("model_type,overrides", SERVED, ids=IDS)
def test_other_decoders_match_the_base_and_continue_a_memory_exactly(model_type, overrides):
    ids = random_ids(1, 4 * W + 5)
    base = _tiny(model_type, overrides)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(_tiny(model_type, overrides), BeaconConfig(window=W, ratios=[0, 4]))
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


@pytest.mark.parametrize("model_type,overrides", SERVED, ids=IDS)
def test_other_decoders_train_only_the_beacon_parameters(model_type, overrides):
    model = get_peft_model(_tiny(model_type, overrides), BeaconConfig(window=W, ratios=[4]))
    model.train()
    ids = random_ids(2, 3 * W + 2)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("beacon_" in name for name in grads)  # the frozen base (experts, routers too) gets none
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "beacon_k" in name)  # the memory's keys learn


@pytest.mark.parametrize("model_type,overrides", list(OPENED_ARCHS.items()), ids=list(OPENED_ARCHS))
def test_opened_decoders_grouped_equal_the_window_loop_and_survive_a_round_trip(model_type, overrides, tmp_path):
    """One decoder pass for many windows (sdpa where the model has it: the split CPU path) equals the window loop
    (``group_tokens=1``); the saved adapter loads onto a fresh base and computes the same."""
    attn = "eager" if model_type in ("gpt_oss", "gemma2") else "sdpa"  # no sdpa path: sinks, soft-capping
    config = dict(window=W, ratios=[2, 4], ratio_mix="step-random", ratio_seed=3, sink_size=1)
    ids = random_ids(2, 5 * W + 7, seed=5)
    outs = []
    for group_tokens in (1, 4096):
        model = get_peft_model(_tiny(model_type, overrides, attn=attn),
                               BeaconConfig(**config, group_tokens=group_tokens))
        perturb_beacons(model)
        with torch.no_grad():
            outs.append(model(input_ids=ids))
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=2e-5, rtol=1e-4)
    for a, b in zip(outs[0].past_key_values.kv_tensors(), outs[1].past_key_values.kv_tensors()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_tiny(model_type, overrides, attn=attn), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, outs[1].logits, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["cohere", "ernie4_5", "gpt_oss", "glm"])
def test_a_models_own_rope_convention_is_undone_exactly(model_type):
    """The memory's compressed keys are turned back before RoPE (`BeaconMemory.layer_kv`) in the model's convention:
    interleaved pairs (Cohere, Ernie 4.5, GLM's partial) and half-width tables (gpt-oss)."""
    model = get_peft_model(_tiny(model_type, OPENED_ARCHS[model_type]), BeaconConfig(window=W, ratios=[4]))
    layer = next(m for m in model.modules() if isinstance(m, BeaconAttention))
    rope = layer.anatomy.rope
    assert rope.convention is sys.modules[type(layer.base_layer).__module__].apply_rotary_pos_emb
    decoder = model.base_model.model.model
    k = torch.randn(1, 2, 5, layer.anatomy.head_dim)
    cos, sin = decoder.rotary_emb(k, torch.arange(7, 12)[None])
    rotated = rope.rotate(k, cos, sin)
    assert not torch.allclose(rotated, k, atol=1e-3)
    torch.testing.assert_close(rope.unrotate(rotated, cos, sin), k, atol=1e-5, rtol=1e-5)
    assert LayerRope(on=False).rotate(k, cos, sin) is k  # NoPE layers keep their keys


def test_what_the_probe_found_in_each_layer():
    """Gemma 3 reads one table per layer type; SmolLM3's 4th layer has no RoPE; HunYuan normalises after RoPE;
    GPT-NeoX's fused projection is per-head triples and Phi-3's blocks; gpt-oss has sinks, Gemma 2 soft-caps."""
    def parts(model_type):
        model = get_peft_model(_tiny(model_type, OPENED_ARCHS[model_type]), BeaconConfig(window=W, ratios=[4]))
        return [m.anatomy for m in model.modules() if isinstance(m, BeaconAttention)]

    assert [a.rope.table for a in parts("gemma3_text")] == ["sliding_attention"] * 5 + ["full_attention"]
    assert [a.rope.on for a in parts("smollm3")] == [True, True, True, False]
    assert [a.rope.on for a in parts("cohere2")] == [True, True, True, False]
    assert all(a.norm_after_rope and a.rope.normed_after for a in parts("hunyuan_v1_dense"))
    assert not any(a.norm_after_rope for a in parts("gemma3_text") + parts("olmo3"))
    assert {a.layout for a in parts("gpt_neox")} == {"heads"} and {a.layout for a in parts("phi3")} == {"blocks"}
    assert all(a.sinks == "sinks" for a in parts("gpt_oss")) and all(a.softcap == 50.0 for a in parts("gemma2"))


def test_the_beacon_embedding_starts_as_the_embedding_modules_output():
    """Gemma 3 scales its embeddings inside the embedding module (by sqrt(hidden)): the beacon embedding, which replaces
    that module's output at beacon slots, starts as the eos token's output, not as its bare weight row."""
    model = get_peft_model(_tiny("gemma3_text", OPENED_ARCHS["gemma3_text"]), BeaconConfig(window=W, ratios=[4]))
    embed = model.get_input_embeddings()
    eos = model.config.eos_token_id
    beacon = model.base_model.beacon_embedding["default"]
    torch.testing.assert_close(beacon, embed(torch.tensor([[eos]]))[0].detach(), atol=0, rtol=0)
    assert embed.embed_scale != 1 and not torch.allclose(beacon, embed.weight[eos : eos + 1])


def test_an_attention_no_reading_reproduces_is_refused():
    """The probe refuses an attention module whose output none of its readings reproduces (here: doubled)."""
    model = tiny_auto("llama")
    attn_cls = type(model.model.layers[0].self_attn)
    doubled = type("DoubledAttention", (attn_cls,), {"forward": lambda self, *a, **k: (
        attn_cls.forward(self, *a, **k)[0] * 2, None)})
    for layer in model.model.layers:
        layer.self_attn.__class__ = doubled
    with pytest.raises(TypeError, match="no reading of its attention DoubledAttention .* reproduces its own output"):
        get_peft_model(model, BeaconConfig(window=W, ratios=[4]))
    assert not any(isinstance(m, BeaconAttention) for m in model.modules())


REFUSED = [
    ("stablelm", {}, "without passing its keyword arguments on"),
    ("bitnet", {}, "attn_sub_norm"),
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


def test_a_multimodal_wrapper_handing_its_decoder_a_dict_of_masks_is_refused_before_any_work():
    """Gemma 3 4B and up are Gemma3ForConditionalGeneration checkpoints: their wrapper hands the language model a dict
    of masks per layer type, which the window loop cannot read (a TypeError naming the text-only way)."""
    from tiny import COMMON
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3", text_config={**COMMON, "head_dim": 16},
                                  vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14),
                                  mm_tokens_per_image=4)
    config._attn_implementation = "eager"
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(),
                           BeaconConfig(window=W, ratios=[4], target_modules=r".*language_model.*self_attn"))
    with pytest.raises(TypeError, match="got a dict .*Gemma3ForConditionalGeneration.*Gemma3ForCausalLM"):
        model(input_ids=random_ids(1, 2 * W))


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
