"""``beacon-peft-serve`` / ``beacon-peft serve``: the vLLM command line it builds, and its refusals (no vLLM needed:
the server itself runs in tests/test_serving.py, opt-in)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from beacon_peft_serve import cli


def test_the_connector_is_configured_and_arguments_pass_through(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    cmd = cli.command(["--model", "/models/base", "--memory-root", str(tmp_path), "--enable-prefix-caching",
                       "--port", "8001"])
    config = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": "BeaconMemoryConnector",
                      "kv_connector_module_path": "beacon_peft_serve.connector", "kv_role": "kv_consumer",
                      "kv_load_failure_policy": "fail",
                      "kv_connector_extra_config": {"memory_root": str(tmp_path.resolve())}}
    assert cmd[-3:] == ["--enable-prefix-caching", "--port", "8001"] and "/models/base" in cmd


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--kv-transfer-config", "{}"], "--kv-transfer-config is set by beacon-peft-serve"),
    (["--model", "m", "--memory-root", "/no/such/folder"], "--memory-root /no/such/folder: no such folder"),
])
def test_bad_arguments(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_without_vllm_it_says_how_to_set_it_up(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert cli.main(["--model", "m"]) == 2
    assert "bash scripts/serve_setup.sh" in capsys.readouterr().err
