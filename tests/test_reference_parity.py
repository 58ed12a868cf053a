"""Parity with the official Activation Beacon code (tests/fixtures/reference, tiny Qwen2, fp32).

The checkpoint is converted with `beacon_peft.convert_official` and loaded as a stock base + PEFT adapter.
Tolerances from the reference README (tests/fixtures/reference/README.md): losses 1e-5, logits 1e-4, memory K/V
1e-4; memory sizes and per-step chunk layouts exactly;
generated ids after checking the step logits under teacher forcing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import VARIANTS, converted, inputs, load_model, outputs

CASE_INPUT = {"a_seq200": "seq200", "b_batch2": "batch2_200", "e_seq192": "seq192", "f_seq40": "seq40"}
PROMPTS = (150, 120, 40)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return converted(tmp_path_factory.mktemp("reference"))


def _model(folders, variant, attn="eager"):
    base_dir, adapters = folders
    return load_model(base_dir, adapters[variant], attn=attn)


def _check_memory(memory, expected: dict, tensors: dict, prefix: str) -> None:
    sizes = memory.sizes()
    assert (sizes["sink"], sizes["comp"], sizes["raw"]) == (expected["sink"], expected["beacon"], expected["raw"])
    for layer in range(2):
        for part, ours in (("sink", "sink"), ("beacon", "comp"), ("raw", "raw")):
            key = f"{prefix}.memory_after.layer{layer}.{part}_key_preRoPE"
            if key not in tensors:
                assert sizes[ours] == 0
                continue
            k, v = memory.layer_kv(layer, ours)
            torch.testing.assert_close(k, tensors[key][0], atol=1e-4, rtol=0)
            torch.testing.assert_close(v, tensors[f"{prefix}.memory_after.layer{layer}.{part}_value"][0], atol=1e-4,
                                       rtol=0)


def _steps(memory) -> list[tuple[int, int, int]]:
    return [(s["input_len"], s["mem_size"], s["beacon_size"]) for s in memory.steps()]


def _ref_steps(meta_case) -> list[tuple[int, int, int]]:
    return [(s["input_len"], s["mem_size"], s["beacon_size"]) for s in meta_case["steps"]]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(CASE_INPUT))
def test_forward_parity(folders, variant, mode, case):
    model = _model(folders, variant)
    model.train(mode == "train")
    tensors, meta = outputs(variant)
    name = f"{case}_{mode}"
    ids = inputs()[CASE_INPUT[case]]
    out = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert abs(out.loss.item() - meta[name]["loss"]) < 1e-5
    torch.testing.assert_close(out.logits, tensors[f"{name}.all_raw_logits"], atol=1e-4, rtol=0)
    last = tensors[f"{name}.last_step_logits"]
    torch.testing.assert_close(out.logits[:, -last.shape[1] :], last, atol=1e-4, rtol=0)
    # per-row token mean (batch_loss)
    token_loss = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(token_loss.mean(1), tensors[f"{name}.batch_loss"], atol=1e-5, rtol=0)
    memory = out.past_key_values
    assert _steps(memory) == _ref_steps(meta[name])
    if case == "a_seq200":
        _check_memory(memory, meta[name]["memory_after"], tensors, name)
    else:
        expected = meta[name]["memory_after"]
        sizes = memory.sizes()
        assert (sizes["sink"], sizes["comp"], sizes["raw"]) == (expected["sink"], expected["beacon"], expected["raw"])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prefill_parity(folders, variant, prompt):
    model = _model(folders, variant)
    tensors, meta = outputs(variant)
    name = f"d_prefill_prompt{prompt}"
    ids = inputs()[f"prompt{prompt}"]
    with torch.no_grad():
        out = model(input_ids=ids)
    torch.testing.assert_close(out.logits, tensors[f"{name}.all_raw_logits"], atol=1e-4, rtol=0)
    assert _steps(out.past_key_values) == _ref_steps(meta[name])
    _check_memory(out.past_key_values, meta[name]["memory_after_prefill"], tensors, name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generation_parity(folders, variant, prompt, attn):
    model = _model(folders, variant, attn)
    tensors, meta = outputs(variant)
    name = f"c_generate_prompt{prompt}"
    ids = inputs()[f"prompt{prompt}"]
    ref_ids = tensors[f"{name}.generated_ids"].reshape(1, -1)
    ref_logits = tensors[f"{name}.greedy_step_logits"]
    # teacher forcing: prompt, then one reference token per call, continuing the memory
    with torch.no_grad():
        out = model(input_ids=ids)
        step_logits = [out.logits[:, -1]]
        memory = out.past_key_values
        for t in range(ref_ids.shape[1] - 1):
            out = model(input_ids=ref_ids[:, t : t + 1], past_key_values=memory)
            step_logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(step_logits, 1), ref_logits, atol=1e-4, rtol=0)
    # then the real generate() path
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ref_ids.shape[1],
                         do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    assert gen.sequences[:, ids.shape[1] :].tolist() == ref_ids.tolist()
    expected = meta[name]["memory_after_generate"]
    sizes = gen.past_key_values.sizes()
    assert (sizes["sink"], sizes["comp"], sizes["raw"]) == (expected["sink"], expected["beacon"], expected["raw"])
    assert _steps(gen.past_key_values) == _ref_steps(meta[name])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sdpa_matches_eager(folders, variant):
    ids = inputs()["batch2_200"]
    eager = _model(folders, variant, "eager")
    sdpa = _model(folders, variant, "sdpa")
    with torch.no_grad():
        a, b = eager(input_ids=ids, labels=ids), sdpa(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
