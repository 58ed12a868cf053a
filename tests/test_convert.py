"""`beacon-peft convert-official` and `convert_official`: folders, configs and errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from reference import require_reference
from safetensors.torch import load_file

from beacon_peft.cli import main
from beacon_peft.convert import config_from_official, convert_official


def test_cli_writes_a_peft_adapter_and_a_stock_base(tmp_path, capsys):
    ref = require_reference()
    command = ["convert-official", str(ref), "--out", str(tmp_path / "ad"), "--base-out", str(tmp_path / "base")]
    assert main(command) == 0
    assert "window=64" in capsys.readouterr().out
    adapter = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert set(adapter) == {"base_model.beacon_embedding"} | {
        f"base_model.model.model.layers.{i}.self_attn.beacon_{p}.{w}" for i in (0, 1) for p in "qkv"
        for w in ("weight", "bias")}
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["window"], config["ratios"], config["sink_size"]) == ("BEACON", 64, [2], 0)
    base_config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert not any(k.startswith("beacon_") for k in base_config)
    assert not any("beacon" in k for k in load_file(tmp_path / "base" / "model.safetensors"))


def test_console_script_is_installed(tmp_path):
    ref = require_reference()
    exe = shutil.which("beacon-peft") or str(__import__("pathlib").Path(sys.executable).with_name("beacon-peft"))
    done = subprocess.run([exe, "convert-official", str(ref), "--out", str(tmp_path / "ad")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ad" / "adapter_config.json").exists()


def test_cli_errors_are_clear(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    assert main(["convert-official", str(src), "--out", str(tmp_path / "ad")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert-official", str(src), "--out", str(tmp_path / "ad")]) == 2
    assert "beacon_window" in capsys.readouterr().err
    assert not (tmp_path / "ad").exists()  # nothing half-written


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"beacon_ratio_mix": "adapt-1024", "beacon_ratio": [2, 4, 8]}, ("adapt", 1024)),
        ({"beacon_attn": "full-converage"}, ("step-random", 128)),
    ],
)
def test_official_config_mapping(fields, expected):
    config = config_from_official({"beacon_window": 64, "beacon_stride": 64, **fields})
    assert (config.ratio_mix, config.adapt_future_tokens) == expected
    assert config.attention_scope in ("full-coverage",)
    with pytest.raises(ValueError, match="beacon_parallel_window=2"):
        config_from_official({"beacon_window": 64, "beacon_parallel_window": 2})


@pytest.mark.parametrize("text, match", [
    ('{"beacon_window": 64,', r"is not valid JSON \(Expecting property name enclosed in double quotes: "
                              r"line 1 column 22 \(char 21\)\): allowed a JSON object"),
    ("", r"is not valid JSON \(Expecting value: line 1 column 1 \(char 0\)\): allowed a JSON object"),
    ('[{"beacon_window": 64}]', r"holds a JSON array, not an object: allowed a JSON object"),
], ids=["truncated", "empty", "an array"])
def test_config_that_is_not_a_json_object_is_refused_before_writing(tmp_path, capsys, text, match):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(text)
    named = re.escape(str(src / "config.json")) + " " + match
    with pytest.raises(ValueError, match=named):
        convert_official(src, tmp_path / "ad", base_dir=tmp_path / "base")
    assert main(["convert-official", str(src), "--out", str(tmp_path / "ad")]) == 2
    err = capsys.readouterr().err
    assert re.search(named, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output folder, no temporary folder
