"""recipes/configs: every YAML parses with the script's own parser and gives the paper's settings (or the CPU
configs' offline model and data); the accelerate configs load; unknown keys and inconsistent arguments are refused."""

from __future__ import annotations

import pytest
import yaml
from tiny_recipe import ROOT, base_args

from beacon_peft import BeaconConfig, training
from beacon_peft.training.sizing import PRESETS

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_config_parses_with_the_script_parser(path):
    raw = yaml.safe_load(path.read_text())
    script_args, beacon_args, training_args, model_args = training.parse_args(["--config", str(path)])
    config = beacon_args.to_config()  # the adapter config it would build
    assert isinstance(config, BeaconConfig)
    assert training_args.packing is False and script_args.stage in ("pretrain", "finetune")
    assert model_args.model_name_or_path and script_args.dataset_name
    assert training_args.max_length > config.window
    if path.name.startswith("smollm2-135m"):  # CPU configs on the offline model and corpora
        assert model_args.model_name_or_path == "offline:smollm2"
        assert script_args.dataset_name in ("essays:train", "offline:all", "offline:retrieval")
        assert training_args.max_steps > 0
        return
    # the paper's settings; a model whose local layers see fewer tokens (Gemma 3 1B: 512, gpt-oss: 128) has its
    # sliding window as the beacon window (docs/semantics.md, "Sliding-window layers")
    sliding = PRESETS.get(model_args.model_name_or_path, {}).get("sliding_window")
    if sliding is not None and sliding < 1024:
        assert config.window == sliding
    else:
        assert 1024 <= config.window <= 2048
    assert raw["bf16"] is True and raw["activation_checkpointing"] is True
    assert raw.get("packing", False) is False and raw["train_sampling_strategy"] == "group_by_length"
    if script_args.stage == "pretrain":  # ratios up to 32, as far as a window keeps 8 beacons
        assert config.ratios == [r for r in (2, 4, 8, 16, 32) if config.window // r >= 8]
        assert training_args.learning_rate == 5e-5
    else:
        assert config.ratios == [2, 4, 8]
    assert training_args.max_length <= 20480
    if "qlora" in path.name:
        assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"
    else:
        assert not model_args.load_in_4bit
    if "lowrank" in path.name:  # the one-24-GB-GPU configs of docs/training.md
        assert config.beacon_rank in (64, 128) and model_args.load_in_4bit and not model_args.upcast_unquantized
        assert 16384 <= training_args.max_length <= 20480


def test_configs_cover_the_paper_settings():
    names = {p.name for p in CONFIGS}
    for model in ("llama3-8b", "mistral-7b", "qwen2-7b", "qwen2.5-7b"):
        assert f"{model}-pretrain.yaml" in names and f"{model}-finetune.yaml" in names, model
    assert any("qlora" in n for n in names) and "smollm2-135m-cpu.yaml" in names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == ("no" if "cpu" in path.name else "bf16")
    assert str(config.distributed_type).removeprefix("DistributedType.") in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: x\ndataset_name: y\nwindwo: 128\n")
    with pytest.raises(ValueError, match="windwo"):
        training.parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max_length", "32"], "max_length=32 must exceed window=32"),
        (["--packing", "true"], "packing"),
        (["--min_length", "16"], "min_length=16 must exceed window"),
        (["--ratios", "3"], "does not divide"),
        (["--learning_rate", "-1"], r"learning_rate=-1.0 is out of range: allowed > 0"),
        (["--learning_rate", "0"], r"learning_rate=0.0 is out of range"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0 is out of range: allowed >= 1"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0 is out of range: allowed >= 1"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "max_steps=-1 and num_train_epochs=0.0 train nothing"),
    ],
)
def test_bad_arguments_raise(extra, match, tmp_path):
    argv = base_args("m", "d", tmp_path, *extra)
    with pytest.raises(ValueError, match=match):
        training.parse_args(argv)
