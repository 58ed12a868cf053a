"""Adapter loading is all-or-nothing: a failed `PeftModel.from_pretrained`, `load_adapter`, `add_adapter` or
`get_peft_model` raises a clear error naming what differs and leaves the base model (or the PeftModel) exactly
as it was: same module tree, same parameters and trainability, same outputs, decoder forward not patched."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import COMMON, random_ids, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import beacon_peft.model as beacon_model_module
from beacon_peft import BeaconConfig

W = 16
IDS = random_ids(1, 2 * W + 3)


def llama(**overrides):
    """A tiny Llama with config overrides (another depth, hidden size, head_dim ...)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, **overrides})
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


def state(model) -> dict:
    """Everything a failed load must leave as it was."""
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return {
        "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "logits": logits,
        "patched": model.model.__dict__.get("forward"),  # the beacon loop's patch of the decoder, if any
        "peft_config": hasattr(model, "peft_config"),
    }


def assert_unchanged(model, before: dict) -> None:
    after = state(model)
    assert after["tree"] == before["tree"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, grad) in before["params"].items():
        assert torch.equal(after["params"][name][0], value) and after["params"][name][1] == grad, name
    assert torch.equal(after["logits"], before["logits"])
    assert after["patched"] is before["patched"]  # a base stays unpatched, a PeftModel keeps its own patch
    assert after["peft_config"] == before["peft_config"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapter folders for several models: {name: folder}."""
    root = tmp_path_factory.mktemp("adapters")
    makers = {
        "llama": lambda: get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4])),
        "qwen2": lambda: get_peft_model(tiny_model("qwen2"), BeaconConfig(window=W, ratios=[4])),
        "one_layer": lambda: get_peft_model(llama(num_hidden_layers=1), BeaconConfig(window=W, ratios=[4])),
        "hidden32": lambda: get_peft_model(llama(hidden_size=32), BeaconConfig(window=W, ratios=[4])),
        "head_dim32": lambda: get_peft_model(llama(head_dim=32), BeaconConfig(window=W, ratios=[4])),
        "rank4": lambda: get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4], beacon_rank=4)),
    }
    folders = {}
    for name, make in makers.items():
        folders[name] = root / name
        make().save_pretrained(folders[name])
    return folders


def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def tamper(kind: str, folder):
    """Damage an adapter folder in place."""
    weights = folder / "adapter_model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "garbage":
        weights.write_bytes(b"not a safetensors file" * 8)
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "no weights file":
        weights.unlink()
    elif kind in ("missing tensor", "extra tensor", "embedding shape"):
        tensors = load_file(weights)
        if kind == "missing tensor":
            tensors.pop("base_model.model.model.layers.1.self_attn.beacon_v.weight")
        elif kind == "extra tensor":
            tensors["base_model.model.model.layers.0.self_attn.beacon_o.weight"] = torch.zeros(64, 64)
        else:
            tensors["base_model.beacon_embedding"] = torch.zeros(2, 64)
        save_file(tensors, weights)
    elif kind in ("rank in config only", "no rank in config", "beacon_layers beyond depth", "bad window",
                  "unknown key"):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update({"rank in config only": {"beacon_rank": 4}, "no rank in config": {"beacon_rank": None},
                       "beacon_layers beyond depth": {"beacon_layers": [5]}, "bad window": {"window": 0},
                       "unknown key": {"beacon_window": 8}}[kind])
        (folder / "adapter_config.json").write_text(json.dumps(config))


# (adapter, tamper, model to load onto, error, message)
LOAD_CASES = [
    ("llama", "truncated", "llama", ValueError, "is corrupt or truncated.*incomplete metadata"),
    ("llama", "garbage", "llama", ValueError, "is corrupt or truncated"),
    ("llama", "empty", "llama", ValueError, "is corrupt or truncated"),
    ("llama", "no weights file", "llama", FileNotFoundError, "holds no adapter_model.safetensors"),
    ("llama", "missing tensor", "llama", ValueError, r"1 tensor\(s\) missing.*layers.1.self_attn.beacon_v.weight"),
    ("llama", "extra tensor", "llama", ValueError, r"no place for.*beacon_o.weight"),
    ("llama", "embedding shape", "llama", ValueError, r"base_model.beacon_embedding: adapter shape \(2, 64\) vs model "
                                                     r"\(1, 64\)"),
    ("llama", "rank in config only", "llama", ValueError, "low-rank beacon projections"),
    ("llama", "beacon_layers beyond depth", "llama", ValueError,
     r"beacon_layers=\[5\] names layer\(s\) \[5\] beyond the model's depth: allowed \[0, 1\]"),
    ("llama", "bad window", "llama", ValueError, "window=0 is out of range"),
    ("llama", "unknown key", "llama", ValueError,
     r"holds \['beacon_window'\], which this beacon_peft does not understand.*allowed the BeaconConfig fields"),
    ("qwen2", None, "llama", ValueError, "has beacon projection biases.*this model's projections have none"),
    ("llama", None, "qwen2", ValueError, "this model's projections have biases"),
    ("llama", None, "one_layer", ValueError, "layers up to 1.*num_hidden_layers=1"),
    ("one_layer", None, "llama", ValueError, r"tensor\(s\) missing.*layers.1"),
    ("hidden32", None, "llama", ValueError, r"adapter shape \(1, 32\) vs model \(1, 64\)"),
    ("head_dim32", None, "llama", ValueError, r"beacon_q.weight: adapter shape \(128, 64\) vs model \(64, 64\)"),
    ("rank4", "no rank in config", "llama", ValueError, "low-rank beacon projections"),
]
TARGETS = {"llama": lambda: tiny_model("llama"), "qwen2": lambda: tiny_model("qwen2"),
           "one_layer": lambda: llama(num_hidden_layers=1)}


def prepared(saved, tmp_path, adapter, kind):
    folder = copy_folder(saved[adapter], tmp_path / "adapter")
    if kind:
        tamper(kind, folder)
    return folder


@pytest.mark.parametrize("adapter, kind, target, error, match", LOAD_CASES,
                         ids=[f"{c[0]}-{c[1]}-onto-{c[2]}" for c in LOAD_CASES])
def test_failed_from_pretrained_leaves_base_untouched(saved, tmp_path, adapter, kind, target, error, match):
    folder = prepared(saved, tmp_path, adapter, kind)
    base = TARGETS[target]()
    before = state(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, folder)
    assert_unchanged(base, before)


LLAMA_ON_LLAMA = {kind: (error, match) for adapter, kind, target, error, match in LOAD_CASES
                  if adapter == target == "llama"}


@pytest.mark.parametrize("kind", ["truncated", "missing tensor", "embedding shape", "beacon_layers beyond depth"])
def test_failed_load_adapter_leaves_peft_model_untouched(saved, tmp_path, kind):
    folder = prepared(saved, tmp_path, "llama", kind)
    model = PeftModel.from_pretrained(tiny_model("llama"), saved["llama"])
    tuner = model.base_model
    before = state(model.base_model.model)
    assert before["patched"] is not None  # the first adapter's loop is in place
    adapters = (sorted(model.peft_config), sorted(tuner.beacon_embedding), sorted(tuner._pickers))
    embeddings = {n: (p.detach().clone(), p.requires_grad) for n, p in tuner.beacon_embedding.items()}
    error, match = LLAMA_ON_LLAMA[kind]
    with pytest.raises(error, match=match):
        model.load_adapter(folder, adapter_name="second")
    assert (sorted(model.peft_config), sorted(tuner.beacon_embedding), sorted(tuner._pickers)) == adapters
    layer = tuner.model.model.layers[0].self_attn
    assert "second" not in layer.beacon_q and "second" not in layer.beacon_k
    assert_unchanged(model.base_model.model, before)  # same modules, every tensor and flag equal, same logits
    for name, (value, grad) in embeddings.items():  # the beacon embedding lives on the tuner, outside the LM
        assert torch.equal(tuner.beacon_embedding[name], value) and tuner.beacon_embedding[name].requires_grad == grad


def test_config_keys_beacon_peft_does_not_understand_are_refused(saved):
    """PEFT drops unknown config keys with a warning; a dropped beacon setting would change the computation
    silently, so `BeaconConfig` refuses them on every route (folder, `from_peft_type`, `PeftConfig.from_pretrained`),
    and a config that is all fields loads as before."""
    from peft import PeftConfig

    with pytest.raises(ValueError, match=r"holds \['windw'\], which this beacon_peft does not understand"):
        BeaconConfig.from_peft_type(peft_type="BEACON", window=W, ratios=[4], windw=8)
    with pytest.raises(ValueError, match=r"holds \['windw'\]"):
        BeaconConfig.from_peft_type(window=W, ratios=[4], windw=8)
    assert BeaconConfig.from_peft_type(peft_type="BEACON", window=W, ratios=[4]).window == W
    loaded = PeftConfig.from_pretrained(saved["llama"])
    assert isinstance(loaded, BeaconConfig) and loaded.window == W


def test_low_rank_adapter_loads_under_its_saved_name(saved):
    """The check maps keys as PEFT's loader does: a valid adapter is not refused."""
    model = PeftModel.from_pretrained(tiny_model("llama"), saved["rank4"])
    assert model.base_model.model.model.layers[0].self_attn.beacon_k["default"].A.weight.shape == (4, 64)


@pytest.mark.parametrize("config, error, match", [
    (dict(beacon_layers=[2]), ValueError, r"beacon_layers=\[2\] names layer\(s\) \[2\] beyond the model's depth: "
                                          r"allowed \[0, 1\] \(num_hidden_layers=2\)"),
    (dict(target_modules=["model.layers.0.self_attn"]), ValueError,
     r"wrapped 1 attention modules but the decoder has 2 layers"),
])
def test_failed_get_peft_model_leaves_base_untouched(config, error, match):
    base = tiny_model("llama")
    before = state(base)
    with pytest.raises(error, match=match):
        get_peft_model(base, BeaconConfig(window=W, ratios=[4], **config))
    assert_unchanged(base, before)


def test_embed_init_without_token_id_leaves_base_untouched():
    base = llama(bos_token_id=None)
    before = state(base)
    with pytest.raises(ValueError, match="embed_init='bos' but the model config has no bos_token_id"):
        get_peft_model(base, BeaconConfig(window=W, ratios=[4], embed_init="bos"))
    assert_unchanged(base, before)


class Boom(RuntimeError):
    pass


def exploding_picker(*args, **kwargs):
    raise Boom("injected failure after the layers were wrapped")


def test_failure_after_wrapping_is_rolled_back(monkeypatch):
    """A failure at the very end of injection (layers wrapped, embedding added) undoes all of it."""
    base = tiny_model("llama")
    before = state(base)
    monkeypatch.setattr(beacon_model_module, "RatioPicker", exploding_picker)
    with pytest.raises(Boom):
        get_peft_model(base, BeaconConfig(window=W, ratios=[4]))
    assert_unchanged(base, before)


def test_failed_add_adapter_is_rolled_back(monkeypatch):
    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=W, ratios=[4])).eval()
    tuner = model.base_model
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    monkeypatch.setattr(beacon_model_module, "RatioPicker", exploding_picker)
    with pytest.raises(Boom):
        model.add_adapter("other", BeaconConfig(window=W, ratios=[2]))
    assert sorted(model.peft_config) == sorted(tuner.beacon_embedding) == ["default"]
    assert all("other" not in m.beacon_q for m in tuner.model.modules() if hasattr(m, "beacon_q"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert "forward" in tuner.model.model.__dict__  # still patched for the first adapter
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, logits)
