"""A 4-bit (bitsandbytes nf4) base saved to disk and reloaded: beacon copies are dequantized, the rest stays 4-bit."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from tiny import random_ids, tiny_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from beacon_peft import BeaconConfig

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[quant]')")
W = 16
# bitsandbytes' CPU fast path (eval, no grad, CPUs with AVX512-BF16) repacks 4-bit weights assuming in_features is a
# multiple of the quantization block (64) and out_features of 32, as in real models (SmolLM2: 576, 1536). The
# tiny models' MLP width 96 is neither; 128 is (docs/training.md, "4-bit on CPU").
QUANT_SHAPES = dict(intermediate_size=128)


def load_4bit(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_4bit_train_generate_save_load(arch, tmp_path):
    tiny_model(arch, **QUANT_SHAPES).save_pretrained(tmp_path / "base")
    base = prepare_model_for_kbit_training(load_4bit(tmp_path / "base"), use_gradient_checkpointing=True)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    model = get_peft_model(base, BeaconConfig(window=W, ratios=[4]))
    beacon_q = model.base_model.model.model.layers[0].self_attn.beacon_q["default"]
    dequantized = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    torch.testing.assert_close(beacon_q.weight, dequantized.float(), atol=0, rtol=0)
    assert beacon_q.weight.dtype == torch.float32 and beacon_q.weight.requires_grad

    model.train()
    ids = random_ids(2, 3 * W + 5)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all("beacon_" in n for n, p in model.named_parameters() if p.grad is not None)
    assert beacon_q.weight.grad is not None and beacon_q.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    gen = model.generate(input_ids=ids[:1], max_new_tokens=W, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(reloaded.generate(input_ids=ids[:1], max_new_tokens=W, do_sample=False, pad_token_id=0), gen)


def test_4bit_with_low_rank_beacon_projections(tmp_path):
    tiny_model("llama", **QUANT_SHAPES).save_pretrained(tmp_path / "base")
    base = prepare_model_for_kbit_training(load_4bit(tmp_path / "base"), use_gradient_checkpointing=True)
    model = get_peft_model(base, BeaconConfig(window=W, ratios=[4], beacon_rank=2)).train()
    ids = random_ids(1, 3 * W)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(".A." in n or ".B." in n or "beacon_embedding" in n for n in grads)


def test_beacon_copies_of_a_4bit_base_already_run_in_eval_mode(tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU kernel on the first eval forward (on CPUs with AVX512-BF16);
    beacon copies made afterwards must still equal the weights the base computes with."""
    tiny_model("llama", **QUANT_SHAPES).save_pretrained(tmp_path / "base")
    base = load_4bit(tmp_path / "base").eval()
    ids = random_ids(1, 20)
    with torch.no_grad():
        base(input_ids=ids)  # may repack every Linear4bit for the CPU kernel
        x = torch.randn(3, base.config.hidden_size)
        expected = base.model.layers[0].self_attn.q_proj(x)
    model = get_peft_model(base, BeaconConfig(window=W, ratios=[4]))
    beacon_q = model.base_model.model.model.layers[0].self_attn.beacon_q["default"]
    with torch.no_grad():
        torch.testing.assert_close(beacon_q(x), expected, atol=2e-2, rtol=2e-2)
        assert torch.equal(model.base_model.model.model.layers[0].self_attn.base_layer.q_proj(x), expected)


def _kernel_jump(base, ids: torch.Tensor) -> float:
    """How far the 4-bit base's own logits move when the input of every 4-bit kernel moves by float32 rounding (a
    relative 1e-6): ~1e-6 where bitsandbytes computes in float32, ~1e-2 where its CPU kernel (AVX512-BF16 chips)
    rounds the activations to bfloat16 first. Measured here, never assumed per machine."""
    gen = torch.Generator().manual_seed(0)

    def nudge(module, args):
        return (args[0] * (1 + 1e-6 * torch.randn(args[0].shape, generator=gen)),)

    with torch.no_grad():
        plain = base(input_ids=ids).logits
        hooks = [m.register_forward_pre_hook(nudge) for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
        try:
            nudged = base(input_ids=ids).logits
        finally:
            for hook in hooks:
                hook.remove()
    return (plain - nudged).abs().max().item()


def _dequantized(model):
    """``model`` with every `Linear4bit` replaced by a float32 `nn.Linear` holding its dequantized weights: the same
    weights through an exact float32 matmul."""
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def test_4bit_base_grouped_equals_window_loop(tmp_path, monkeypatch):
    """A 4-bit base: one decoder pass for many windows gives the window loop's logits, memory and adapter gradients
    (inference through the CPU's exact per-window path, training through both window paths).

    The two orders sum the attention differently (differences ~1e-6, as on a float32 base). On CPUs with
    AVX512-BF16, bitsandbytes' 4-bit kernel rounds its input activations to bfloat16, so such a difference can
    flip one rounding and move a hidden state by one bfloat16 step (seen: one position of 90, 6e-3 in the logits,
    born in layer 1's o_proj from inputs that differed by 1.2e-6). So the eval logits are compared within what the
    4-bit base itself moves by for float32-sized input changes (`_kernel_jump`, measured here; 2e-5 where the
    kernel is float32), and the same weights through an exact float32 matmul (`_dequantized`) must agree within
    2e-5. Training runs each window as its own masked call in both orders (bit-identical attention inputs), so loss
    and gradients are held to 2e-5."""
    from beacon_peft.layer import BeaconAttention

    tiny_model("llama", **QUANT_SHAPES).save_pretrained(tmp_path / "base")
    ids = random_ids(1, 90, seed=4)
    jump = _kernel_jump(load_4bit(tmp_path / "base").eval(), ids)
    results, exact = {}, {}
    for path in ("auto", "masked"):
        monkeypatch.setattr(BeaconAttention, "windows_path", path)
        for group in (1, 4096):
            model = get_peft_model(load_4bit(tmp_path / "base"),
                                   BeaconConfig(window=16, ratios=[4], group_tokens=group)).train()
            with torch.no_grad():
                logits = model.eval()(input_ids=ids).logits
                exact[path, group] = _dequantized(model).eval()(input_ids=ids).logits if path == "auto" else None
            model = get_peft_model(load_4bit(tmp_path / "base"),
                                   BeaconConfig(window=16, ratios=[4], group_tokens=group)).train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            results[path, group] = (logits, loss.detach(), grads)
    torch.testing.assert_close(exact["auto", 4096], exact["auto", 1], atol=2e-5, rtol=1e-4)
    for path in ("auto", "masked"):
        (la, lossa, ga), (lb, lossb, gb) = results[path, 1], results[path, 4096]
        torch.testing.assert_close(lb, la, atol=max(2e-5, jump), rtol=1e-4)
        torch.testing.assert_close(lossb, lossa, atol=2e-5, rtol=1e-4)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], atol=2e-5, rtol=1e-4)
