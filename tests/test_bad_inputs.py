"""Bad and unusual inputs: each must raise a clear ValueError/TypeError naming the bad value, before any work,
leaving everything (memory, model, files) as it was. Catalogued in docs/reliability.md."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from tiny import COMMON, random_ids, tiny_model
from transformers import DynamicCache

from beacon_peft import BeaconConfig
from beacon_peft.cli import main
from beacon_peft.convert import convert_official

W = 16


@pytest.fixture(scope="module")
def model():
    return get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4])).eval()


@pytest.fixture(scope="module")
def memory(model):
    with torch.no_grad():
        return model(input_ids=random_ids(1, W + 5)).past_key_values


def snapshot(memory) -> tuple:
    """Everything a call could change in a memory: sizes, byte count, columns, ratio log and the K/V tensors."""
    tensors = [t.clone() for t in memory.kv_tensors()]
    return memory.num_entries(), memory.nbytes(), memory.get_seq_length(), memory.ratios_used, tensors


def assert_same(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert len(a[4]) == len(b[4]) and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))


# --- BeaconConfig fields: wrong types and out-of-range values ----------------------------------------------------
CONFIG_CASES = [
    (dict(window=0), ValueError, "window=0 is out of range: allowed >= 1"),
    (dict(window=-1), ValueError, "window=-1 is out of range: allowed >= 1"),
    (dict(window="16"), TypeError, "window must be an int, got '16'"),
    (dict(window=16.0), TypeError, "window must be an int, got 16.0"),
    (dict(window=True), TypeError, "window must be an int, got True"),
    (dict(window=16, stride=0), ValueError, r"stride=0 is out of range: allowed in \[1, 16\]"),
    (dict(window=16, stride=17), ValueError, r"stride=17 is out of range: allowed in \[1, 16\]"),
    (dict(window=16, stride="8"), TypeError, "stride must be an int, got '8'"),
    (dict(window=16, stride=8, ratios=[4]), ValueError, "stride=8 != window=16 needs placement='append'"),
    (dict(window=16, ratios=[]), TypeError, r"ratios must be a non-empty list of ints, got \[\]"),
    (dict(window=16, ratios=4), TypeError, "ratios must be a non-empty list of ints, got 4"),
    (dict(window=16, ratios="4"), TypeError, "ratios must be a non-empty list of ints, got '4'"),
    (dict(window=16, ratios=None), TypeError, "ratios must be a non-empty list of ints, got None"),
    (dict(window=16, ratios=[3]), ValueError, "ratio 3 does not divide stride 16"),
    (dict(window=16, ratios=[32]), ValueError, "ratios entry=32 is out of range"),
    (dict(window=16, ratios=[-1]), ValueError, "ratios entry=-1 is out of range"),
    (dict(window=16, ratios=[2.0]), TypeError, "ratios entry must be an int, got 2.0"),
    (dict(window=16, ratios=[True]), TypeError, "ratios entry must be an int, got True"),
    (dict(window=16, ratios=[2, 4], ratio_mix="fixed"), ValueError, r"ratio_mix='fixed' needs exactly one ratio"),
    (dict(ratio_mix="random"), ValueError, "ratio_mix='random' is not allowed"),
    (dict(ratio_mix=None), ValueError, "ratio_mix=None is not allowed"),
    (dict(adapt_future_tokens=-1), ValueError, "adapt_future_tokens=-1 is out of range: allowed >= 0"),
    (dict(adapt_future_tokens="128"), TypeError, "adapt_future_tokens must be an int, got '128'"),
    (dict(ratio_seed=-1), ValueError, "ratio_seed=-1 is out of range: allowed >= 0"),
    (dict(ratio_seed=1.5), TypeError, "ratio_seed must be an int, got 1.5"),
    (dict(placement="middle"), ValueError, "placement='middle' is not allowed"),
    (dict(placement=None), ValueError, "placement=None is not allowed"),
    (dict(attention_scope="full-converage"), ValueError, "attention_scope='full-converage' is not allowed"),
    (dict(attend_prev=1), TypeError, "attend_prev must be a bool, got 1"),
    (dict(attend_prev="yes"), TypeError, "attend_prev must be a bool, got 'yes'"),
    (dict(sink_size=-1), ValueError, r"sink_size=-1 is out of range: allowed in \[0, 1024\]"),
    (dict(window=16, sink_size=17), ValueError, r"sink_size=17 is out of range: allowed in \[0, 16\]"),
    (dict(beacon_projections=None), TypeError, "beacon_projections=None must be a non-empty list"),
    (dict(beacon_projections="qkv"), TypeError, "beacon_projections='qkv' must be a non-empty list"),
    (dict(beacon_projections=[]), TypeError, r"beacon_projections=\[\] must be a non-empty list"),
    (dict(beacon_projections=["q", "x"]), ValueError, r"beacon_projections=\['q', 'x'\] must be distinct"),
    (dict(beacon_projections=["q", "q"]), ValueError, r"beacon_projections=\['q', 'q'\] must be distinct"),
    (dict(embed_init="pad"), ValueError, "embed_init='pad' is not allowed"),
    (dict(beacon_rank=0), ValueError, "beacon_rank=0 is out of range: allowed >= 1"),
    (dict(beacon_rank=-2), ValueError, "beacon_rank=-2 is out of range: allowed >= 1"),
    (dict(beacon_rank=1.5), TypeError, "beacon_rank must be an int, got 1.5"),
    (dict(mask_first_window_loss=1), TypeError, "mask_first_window_loss must be a bool or None, got 1"),
    (dict(mask_first_window_loss="no"), TypeError, "mask_first_window_loss must be a bool or None, got 'no'"),
    (dict(beacon_layers=[-1]), ValueError, "beacon_layers entry=-1 is out of range: allowed >= 0"),
    (dict(beacon_layers=["0"]), TypeError, "beacon_layers entry must be an int, got '0'"),
    (dict(beacon_layers="0,1"), TypeError, "beacon_layers='0,1' must be None or a non-empty list"),
    (dict(beacon_layers=[]), TypeError, r"beacon_layers=\[\] must be None or a non-empty list"),
    (dict(beacon_layers=[1.5]), TypeError, "beacon_layers entry must be an int, got 1.5"),
    (dict(task_type="SEQ_CLS"), ValueError, "task_type='SEQ_CLS' is not supported"),
    (dict(inference_mode="yes"), TypeError, "inference_mode must be a bool, got 'yes'"),
    (dict(inference_mode=1), TypeError, "inference_mode must be a bool, got 1"),
    (dict(target_modules=3), TypeError, "target_modules=3 must be None .every 'self_attn'., a regex string"),
    (dict(target_modules=[]), TypeError, r"target_modules=\[\] must be None"),
    (dict(target_modules=["self_attn", 0]), TypeError, r"target_modules=\['self_attn', 0\] must be None"),
]


@pytest.mark.parametrize("kwargs, error, match", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_config_field_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        BeaconConfig(**kwargs)


# --- model call inputs -------------------------------------------------------------------------------------------
def ids(n=8, batch=1):
    return random_ids(batch, n)


CALL_CASES = [
    ("no input", lambda: dict(), ValueError, "exactly one of input_ids or inputs_embeds"),
    ("ids and embeds", lambda: dict(input_ids=ids(), inputs_embeds=torch.zeros(1, 8, 64)), ValueError,
     "exactly one of input_ids or inputs_embeds"),
    ("float ids", lambda: dict(input_ids=ids().float()), TypeError, "input_ids must be an integer tensor.*float32"),
    ("bool ids", lambda: dict(input_ids=ids() > 5), TypeError, "input_ids must be an integer tensor.*torch.bool"),
    ("id = vocab", lambda: dict(input_ids=torch.tensor([[3, 128]])), ValueError,
     r"token id 128, outside the vocabulary: allowed \[0, 127\]"),
    ("negative id", lambda: dict(input_ids=torch.tensor([[3, -1]])), ValueError,
     r"token id -1, outside the vocabulary: allowed \[0, 127\]"),
    ("1-D ids", lambda: dict(input_ids=ids()[0]), ValueError, r"input_ids must have 2 dims.*got shape \(8,\)"),
    ("3-D ids", lambda: dict(input_ids=ids()[None]), ValueError, r"input_ids must have 2 dims.*\(1, 1, 8\)"),
    ("empty ids", lambda: dict(input_ids=ids()[:, :0]), ValueError, "length 0"),
    ("embeds hidden 32", lambda: dict(inputs_embeds=torch.zeros(1, 8, 32)), ValueError,
     r"inputs_embeds has hidden size 32 but the model's is 64"),
    ("int embeds", lambda: dict(inputs_embeds=torch.zeros(1, 8, 64, dtype=torch.long)), TypeError,
     "inputs_embeds must be a floating-point tensor, got dtype torch.int64"),
    ("2-D embeds", lambda: dict(inputs_embeds=torch.zeros(8, 64)), ValueError,
     r"inputs_embeds must have 3 dims.*\(8, 64\)"),
    ("4-D mask", lambda: dict(input_ids=ids(), attention_mask=torch.ones(1, 1, 8, 8)), ValueError,
     r"attention_mask must be 2-D.*\(1, 1, 8, 8\)"),
    ("short mask", lambda: dict(input_ids=ids(), attention_mask=torch.ones(1, 4)), ValueError,
     r"attention_mask must be 2-D.*\(1, 4\)"),
    ("mask batch 2", lambda: dict(input_ids=ids(), attention_mask=torch.ones(2, 8)), ValueError,
     r"attention_mask must be 2-D \(batch=1.*\(2, 8\)"),
    ("all padding", lambda: dict(input_ids=ids(), attention_mask=torch.zeros(1, 8, dtype=torch.long)), ValueError,
     "every position as padding"),
    ("output_attentions", lambda: dict(input_ids=ids(), output_attentions=True), ValueError,
     "output_attentions=True is not supported"),
    ("output_hidden_states not a bool", lambda: dict(input_ids=ids(), output_hidden_states="yes"), TypeError,
     "output_hidden_states must be True, False or None, got 'yes'"),
    ("unknown keyword", lambda: dict(input_ids=ids(), foo=1), TypeError, r"unexpected keyword argument\(s\) \['foo'\]"),
    ("packed sequences", lambda: dict(input_ids=ids(), cu_seq_lens_q=torch.tensor([0, 8])), ValueError,
     r"\['cu_seq_lens_q'\] describe padding-free packed sequences"),
    ("adapter_names", lambda: dict(input_ids=ids(), adapter_names=["default"]), ValueError,
     r"adapter_names=\['default'\] is not supported by beacon adapters"),
    ("alora_offsets", lambda: dict(input_ids=ids(), alora_offsets=[0]), ValueError,
     r"alora_offsets=\[0\] is not supported by beacon adapters"),
    ("legacy tuple cache", lambda: dict(input_ids=ids(), past_key_values=((torch.zeros(1, 2, 3, 16),) * 2,)),
     TypeError, r"got tuple \(legacy tuple caches are not supported\)"),
    ("list cache", lambda: dict(input_ids=ids(), cache=[]), TypeError, "got list"),
    ("string cache", lambda: dict(input_ids=ids(), cache="memory"), TypeError,
     "the cache must be a BeaconMemory.*got str"),
    ("int cache", lambda: dict(input_ids=ids(), past_key_values=3), TypeError,
     "the cache must be a BeaconMemory.*got int"),
    ("mask value 0.5", lambda: dict(input_ids=ids(), attention_mask=torch.full((1, 8), 0.5)), ValueError,
     r"attention_mask holds 0.5: allowed 1 \(a token\) or 0 \(padding\)"),
    ("mask value 2", lambda: dict(input_ids=ids(), attention_mask=torch.full((1, 8), 2)), ValueError,
     "attention_mask holds 2: allowed 1"),
    ("float labels", lambda: dict(input_ids=ids(), labels=ids().float()), TypeError,
     r"labels must be an integer tensor \(torch.long\), got dtype torch.float32"),
    ("list labels", lambda: dict(input_ids=ids(), labels=ids()[0].tolist()), TypeError,
     "labels must be a tensor of token ids.*got list"),
    ("short labels", lambda: dict(input_ids=ids(), labels=ids(5)), ValueError,
     r"labels must have the input's shape \(batch=1, length=8\), got shape \(1, 5\)"),
    ("labels batch 2", lambda: dict(input_ids=ids(), labels=ids(8, batch=2)), ValueError,
     r"labels must have the input's shape \(batch=1, length=8\), got shape \(2, 8\)"),
    ("label = vocab", lambda: dict(input_ids=ids(4), labels=torch.tensor([[3, -100, 128, 5]])), ValueError,
     r"labels hold 128: allowed token ids in \[0, 127\] or -100 \(ignored\)"),
    ("label -1", lambda: dict(input_ids=ids(4), labels=torch.tensor([[3, -1, 4, 5]])), ValueError,
     r"labels hold -1: allowed token ids in \[0, 127\] or -100"),
]


@pytest.mark.parametrize("name, make, error, match", CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_call_input_refused(model, name, make, error, match):
    with torch.no_grad(), pytest.raises(error, match=match):
        model(**make())


def test_labels_are_checked_before_any_window_is_read(model, monkeypatch):
    """Bad labels fail before the decoder runs (they used to fail in the loss, after the whole forward); labels of
    embeds are checked against their (batch, length) too."""
    import beacon_peft.model as beacon_model

    calls = []
    monkeypatch.setattr(beacon_model, "beacon_decoder_forward", lambda *a, **k: calls.append(1))
    with torch.no_grad(), pytest.raises(ValueError, match=r"labels must have the input's shape \(batch=1, length=8\)"):
        model(inputs_embeds=torch.zeros(1, 8, 64), labels=ids(7))
    with torch.no_grad(), pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(input_ids=ids(), labels=ids().float())
    assert not calls


def test_generate_refuses_a_cache_of_another_type_before_generating(model, monkeypatch):
    """generate(past_key_values="x") got an AttributeError from deep inside transformers; now a TypeError naming the
    allowed caches, before any forward."""
    import beacon_peft.model as beacon_model

    calls = []
    monkeypatch.setattr(beacon_model, "beacon_decoder_forward", lambda *a, **k: calls.append(1))
    for bad in ("memory", [(torch.zeros(1, 2, 3, 16),) * 2]):
        with pytest.raises(TypeError, match="the cache must be a BeaconMemory from an earlier call .or None., got"):
            model.generate(input_ids=ids(), past_key_values=bad, max_new_tokens=2)
    assert not calls


def test_non_empty_dynamic_cache_refused(model):
    cache = DynamicCache(config=model.config)
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with torch.no_grad(), pytest.raises(ValueError, match="got DynamicCache holding 3 tokens"):
        model(input_ids=ids(), cache=cache)
    assert cache.get_seq_length() == 3


def test_empty_dynamic_cache_starts_a_fresh_sequence(model):  # generate()'s own empty cache: not an error
    with torch.no_grad():
        out = model(input_ids=ids(), cache=DynamicCache(config=model.config))
    assert out.past_key_values.sizes()["tokens"] == 8


# --- memories: from another model / setting, or passed twice ----------------------------------------------------
def other_model(**config_overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, **config_overrides})
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


MEMORY_CASES = [
    ("layer count", lambda: get_peft_model(other_model(num_hidden_layers=1), BeaconConfig(window=W, ratios=[4])),
     "num_layers: memory 1 vs model 2"),
    ("head_dim", lambda: get_peft_model(other_model(head_dim=32), BeaconConfig(window=W, ratios=[4])),
     "head_dim: memory 32 vs model 16"),
    ("kv heads", lambda: get_peft_model(other_model(num_key_value_heads=4), BeaconConfig(window=W, ratios=[4])),
     "num_key_value_heads: memory 4 vs model 2"),
    ("window", lambda: get_peft_model(tiny_model("llama"), BeaconConfig(window=8, ratios=[4])),
     "window: memory 8 vs model 16"),
    ("ratios", lambda: get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[2])),
     r"ratios: memory \[2\] vs model \[4\]"),
    ("sink", lambda: get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4], sink_size=2)),
     "sink_size: memory 2 vs model 0"),
    ("placement", lambda: get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4], placement="append")),
     "placement: memory 'append' vs model 'interleave'"),
    ("scope", lambda: get_peft_model(tiny_model("llama"),
                                     BeaconConfig(window=W, ratios=[4], attention_scope="segmentation")),
     "attention_scope: memory 'segmentation' vs model 'full-coverage'"),
]


@pytest.mark.parametrize("name, make, match", MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_memory_from_another_model_or_setting_refused(model, name, make, match, keyword):
    with torch.no_grad():
        foreign = make()(input_ids=ids(W + 5)).past_key_values
        before = snapshot(foreign)
        with pytest.raises(ValueError, match=f"made by another model or adapter setting.*{match}"):
            model(input_ids=ids(4), **{keyword: foreign})
    assert_same(snapshot(foreign), before)


def test_memory_with_other_batch_refused(model, memory):
    before = snapshot(memory)
    with torch.no_grad(), pytest.raises(ValueError, match="the memory holds 1 rows but the input has 2"):
        model(input_ids=ids(4, batch=2), past_key_values=memory)
    assert_same(snapshot(memory), before)


def test_cache_passed_twice_with_different_objects_refused(model, memory):
    with torch.no_grad():
        other = model(input_ids=ids(W + 2)).past_key_values
    before, before_other = snapshot(memory), snapshot(other)
    with torch.no_grad(), pytest.raises(ValueError, match=r"passed twice.*\['cache', 'past_key_values'\]"):
        model(input_ids=ids(4), cache=memory, past_key_values=other)
    assert_same(snapshot(memory), before)
    assert_same(snapshot(other), before_other)
    with torch.no_grad():  # the same object under both names is one cache
        out = model(input_ids=ids(4), cache=other, past_key_values=other)
    assert out.past_key_values is other


def test_get_peft_model_over_a_beacon_model_is_refused_untouched():
    """get_peft_model(peft_model, BeaconConfig) would patch the decoder a second time (each call then recursing
    into the other): refused before any change, the first adapter still computing what it did."""
    first = get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4])).eval()
    with torch.no_grad():
        before = first(input_ids=ids(40)).logits
    with pytest.raises(ValueError, match="this model already carries a beacon adapter.*add_adapter"):
        get_peft_model(first, BeaconConfig(window=W, ratios=[4]))
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids(40)).logits, before)


def test_memory_with_disabled_adapter_refused(model, memory):
    before = snapshot(memory)
    with torch.no_grad(), model.disable_adapter(), pytest.raises(ValueError, match="adapter is disabled"):
        model(input_ids=ids(4), past_key_values=memory)
    assert_same(snapshot(memory), before)


CONTINUATION_CASES = [
    ("id = 999", dict(input_ids=torch.tensor([[3, 999]])), ValueError,
     r"input_ids holds token id 999, outside the vocabulary: allowed \[0, 127\]"),
    ("unknown keyword", dict(foo=1), TypeError, r"unexpected keyword argument\(s\) \['foo'\]"),
    ("float ids", dict(input_ids=torch.zeros(1, 4)), TypeError,
     r"input_ids must be an integer tensor \(torch.long\), got dtype torch.float32"),
    ("embeds hidden 32", dict(inputs_embeds=torch.zeros(1, 4, 32)), ValueError,
     r"inputs_embeds has hidden size 32 but the model's is 64: pass shape \(batch, length, 64\)"),
]


@pytest.mark.parametrize("name, bad, error, match", CONTINUATION_CASES, ids=[c[0] for c in CONTINUATION_CASES])
def test_failed_continuation_leaves_memory_untouched(model, memory, name, bad, error, match):
    before = snapshot(memory)
    kwargs = {"input_ids": ids(4), **bad} if "inputs_embeds" not in bad else bad
    with torch.no_grad(), pytest.raises(error, match=match):
        model(past_key_values=memory, **kwargs)
    assert_same(snapshot(memory), before)


# --- the memory API ---------------------------------------------------------------------------------------------
MEMORY_API_CASES = [
    ("layer -1", lambda m: m.layer_kv(-1, "comp"), ValueError, r"layer=-1 is out of range: allowed \[0, 1\]"),
    ("layer = depth", lambda m: m.layer_kv(2, "comp"), ValueError, r"layer=2 is out of range: allowed \[0, 1\]"),
    ("layer '0'", lambda m: m.layer_kv("0", "comp"), TypeError, r"layer='0' must be an int in \[0, 1\]"),
    ("layer 1.0", lambda m: m.layer_kv(1.0, "raw"), TypeError, r"layer=1.0 must be an int"),
    ("part beacons", lambda m: m.layer_kv(0, "beacons"), ValueError, "part='beacons' is not allowed"),
    ("part empty", lambda m: m.layer_kv(0, ""), ValueError, "part='' is not allowed"),
    ("part None", lambda m: m.layer_kv(0, None), ValueError, "part=None is not allowed"),
    ("row 1", lambda m: m.layer_kv(0, "raw", row=1), ValueError, r"row=1 is out of range: allowed \[0, 0\]"),
    ("row -1", lambda m: m.layer_kv(0, "raw", row=-1), ValueError, r"row=-1 is out of range"),
    ("sizes row 3", lambda m: m.sizes(3), ValueError, r"row=3 is out of range: allowed \[0, 0\]"),
    ("sizes row -1", lambda m: m.sizes(-1), ValueError, r"row=-1 is out of range"),
    ("steps row 'a'", lambda m: m.steps("a"), TypeError, "row='a' must be an int"),
    ("reset", lambda m: m.reset(), NotImplementedError, "never reset"),
    ("crop", lambda m: m.crop(4), NotImplementedError, "cannot be cropped"),
]


@pytest.mark.parametrize("name, call, error, match", MEMORY_API_CASES, ids=[c[0] for c in MEMORY_API_CASES])
def test_memory_api_refuses(memory, name, call, error, match):
    before = snapshot(memory)
    with pytest.raises(error, match=match):
        call(memory)
    assert_same(snapshot(memory), before)


@pytest.mark.parametrize("ratio, error, match", [
    (8, ValueError, r"ratio=8 is not one of this adapter's ratios: allowed \[4\]"),
    (0, ValueError, r"ratio=0 is not one of this adapter's ratios"),
    ("4", TypeError, r"ratio='4' must be an int"),
    (4.0, TypeError, r"ratio=4.0 must be an int"),
])
def test_set_compression_ratio_refuses(model, ratio, error, match):
    picker = model.base_model.ratio_picker("default")
    before = picker.override
    with pytest.raises(error, match=match):
        model.base_model.set_compression_ratio(ratio)
    assert picker.override == before


def test_set_compression_ratio_unknown_adapter(model):
    with pytest.raises(ValueError, match=r"adapter_name='nope' is not an adapter of this model: allowed \['default'\]"):
        model.base_model.set_compression_ratio(4, adapter_name="nope")


def test_set_adapter_unknown(model):
    with pytest.raises(ValueError, match="adapter 'nope' not found"):
        model.base_model.set_adapter("nope")


# --- training: the first-window mask must leave a label ----------------------------------------------------------
@pytest.mark.parametrize("length", [W, W + 1])
def test_append_training_on_a_window_long_sequence_refused(length):
    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4], placement="append")).train()
    seq = ids(length)
    with pytest.raises(ValueError, match=f"labels of length {length} hold no prediction after the first window "
                                         f"\\(window={W}\\).*placement='append'"):
        model(input_ids=seq, labels=seq)
    # the Trainer's normaliser makes it a finite zero; one token more gives a real loss
    assert model(input_ids=seq, labels=seq, num_items_in_batch=torch.tensor(length - 1)).loss.item() == 0.0
    assert torch.isfinite(model(input_ids=ids(W + 2), labels=ids(W + 2)).loss)


# --- convert-official paths --------------------------------------------------------------------------------------
@pytest.fixture()
def official(tmp_path):
    """A tiny official-format checkpoint: config.json with beacon_* fields, base and beacon weights."""
    src = tmp_path / "src"
    src.mkdir()
    base = tiny_model("llama").state_dict()
    weights = {k: v.contiguous() for k, v in base.items()}
    weights["model.beacon_embed_tokens.weight"] = torch.zeros(1, 64)
    for i in range(2):
        for p in "qkv":
            prefix = f"model.layers.{i}.self_attn"
            weights[f"{prefix}.beacon_{p}_proj.weight"] = base[f"{prefix}.{p}_proj.weight"].clone()
    save_file(weights, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "llama", **COMMON, "beacon_window": 16,
                                                 "beacon_ratio": [4]}))
    return src


def listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*"))


CONVERT_CASES = [
    ("out = src", lambda s: ["--out", str(s)], r"out='[^']*src' is the source checkpoint"),
    ("out = src, overwrite", lambda s: ["--out", str(s), "--overwrite"], "is the source checkpoint"),
    ("out inside src", lambda s: ["--out", str(s / "ad")], "lies inside the source checkpoint"),
    ("out inside src, overwrite", lambda s: ["--out", str(s / "ad"), "--overwrite"], "lies inside the source"),
    ("out holds src, overwrite", lambda s: ["--out", str(s.parent), "--overwrite"], "contains the source checkpoint"),
    ("out not empty", lambda s: ["--out", str(s.parent / "full")], r"out='[^']*full' is not empty \(1 entries\)"),
    ("out is a file", lambda s: ["--out", str(s.parent / "file.txt")], "is an existing file"),
    ("base_out = src", lambda s: ["--out", str(s.parent / "ad"), "--base-out", str(s), "--overwrite"],
     "base_out='[^']*src' is the source checkpoint"),
    ("base_out not empty", lambda s: ["--out", str(s.parent / "ad"), "--base-out", str(s.parent / "full")],
     "base_out=.* is not empty"),
    ("base_out = out", lambda s: ["--out", str(s.parent / "ad"), "--base-out", str(s.parent / "ad")], "overlap"),
    ("base_out inside out", lambda s: ["--out", str(s.parent / "ad"), "--base-out", str(s.parent / "ad" / "b")],
     "overlap"),
]


@pytest.mark.parametrize("name, args, match", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_official_refuses_output(official, capsys, name, args, match):
    root = official.parent
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("user data")
    (root / "file.txt").write_text("user file")
    before = listing(root)
    assert main(["convert-official", str(official), *args(official)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert listing(root) == before  # nothing written, nothing deleted


def test_convert_official_library_call_refuses_too(official):
    with pytest.raises(ValueError, match="is the source checkpoint"):
        convert_official(official, official, overwrite=True)


def test_convert_official_overwrite_replaces_only_the_output(official, capsys):
    out = official.parent / "ad"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    source_before = listing(official)
    assert main(["convert-official", str(official), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(["convert-official", str(official), "--out", str(out), "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").exists() and not (out / "stale.txt").exists()
    assert listing(official) == source_before
    assert not [p for p in official.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


# --- training: a batch shorter than one window still has a loss to backpropagate --------------------------------
@pytest.mark.parametrize("placement, length", [("interleave", 3), ("interleave", W), ("append", 3)])
def test_training_batch_shorter_than_a_window_backpropagates(placement, length):
    """No beacon is made, so nothing trainable is touched: as any adapter on a batch it does not touch, the loss
    keeps its value, backward works and the adapter's parameters get zero (or no) gradients."""
    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4], placement=placement,
                                                            mask_first_window_loss=False)).train()
    seq = ids(length)
    with torch.no_grad():
        expected = model(input_ids=seq, labels=seq).loss
    loss = model(input_ids=seq, labels=seq).loss
    assert loss.grad_fn is not None and torch.equal(loss.detach(), expected)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("beacon_" in n for n in trainable)
    assert all(p.grad is None or not p.grad.any() for p in trainable.values())
    assert any(p.grad is not None for p in trainable.values())  # connected through the beacon embedding


def test_trainer_survives_a_batch_shorter_than_a_window(tmp_path):
    """A data set holding a sequence shorter than one window (as a data set's last, short batch): the Trainer's
    run completes every step with finite losses."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4])).train()
    data = [{"input_ids": r, "labels": r} for r in (ids(W + 8)[0], ids(3)[0], ids(2 * W)[0])]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, num_train_epochs=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    collate = lambda batch: {k: torch.stack([row[k] for row in batch]) for k in batch[0]}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
