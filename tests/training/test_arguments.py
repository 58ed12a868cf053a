"""The training recipe's adapter arguments are `BeaconConfig`'s: same names, defaults and allowed values."""

from __future__ import annotations

import importlib.util
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from peft.config import PeftConfig

from beacon_peft import config as config_module
from beacon_peft.config import BeaconConfig
from beacon_peft.training import arguments, parse_args
from beacon_peft.training.arguments import MIRRORED_FIELDS, NOT_ARGUMENTS, OLD_RATIO_MIXES, BeaconArguments

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--report_to", "none",
        "--max_length", "2048"]


def default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def test_every_config_field_is_an_argument_or_named_as_left_out():
    own = {f.name for f in fields(BeaconConfig)} - {f.name for f in fields(PeftConfig)}
    assert own == set(MIRRORED_FIELDS) | set(NOT_ARGUMENTS)
    assert not set(MIRRORED_FIELDS) & set(NOT_ARGUMENTS)
    assert set(MIRRORED_FIELDS) <= {f.name for f in fields(BeaconArguments)}


def test_defaults_agree():
    config_fields = {f.name: f for f in fields(BeaconConfig)}
    argument_fields = {f.name: f for f in fields(BeaconArguments)}
    for name in MIRRORED_FIELDS:
        assert default(argument_fields[name]) == default(config_fields[name]), name
    built, plain = BeaconArguments().to_config(), BeaconConfig()
    assert all(getattr(built, name) == getattr(plain, name) for name in MIRRORED_FIELDS)


def test_allowed_values_agree():
    choices = {f.name: f.metadata.get("choices") for f in fields(BeaconArguments)}
    assert choices["placement"] == list(config_module.PLACEMENTS)
    assert choices["attention_scope"] == list(config_module.SCOPES)
    assert choices["embed_init"] == list(config_module.EMBED_INITS)
    assert choices["beacon_projections"] == list(config_module.PROJECTIONS)
    assert choices["ratio_mix"] == [*config_module.RATIO_MIXES, *OLD_RATIO_MIXES]
    assert set(OLD_RATIO_MIXES.values()) <= set(config_module.RATIO_MIXES)
    for mix in config_module.RATIO_MIXES:  # every adapter mode goes through to the adapter unchanged
        _, beacon_args, _, _ = parse_args([*BASE, "--ratio_mix", mix, "--ratios", "8"])
        assert beacon_args.to_config().ratio_mix == mix and not beacon_args.ratio_per_optimizer_step


@pytest.mark.parametrize("old, mix, per_step", [("window", "step-random", False),
                                                ("sequence", "instance-random", False),
                                                ("step", "step-random", True)])
def test_old_ratio_mix_names_still_parse(old, mix, per_step):
    _, beacon_args, _, _ = parse_args([*BASE, "--ratio_mix", old, "--ratio_seed", "7"])
    assert (beacon_args.ratio_mix, beacon_args.ratio_per_optimizer_step) == (mix, per_step)
    assert beacon_args.optimizer_step_ratio_seed == 7 and beacon_args.to_config().ratio_mix == mix


def test_bad_adapter_values_are_refused_by_the_parser():
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--placement", "sideways"])


def test_the_recipe_script_uses_the_library_parser():
    spec = importlib.util.spec_from_file_location("beacon_recipes_train_args", ROOT / "recipes" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_args is arguments.parse_args
