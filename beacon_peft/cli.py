"""The ``beacon-peft`` console command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="beacon-peft", description="Activation Beacon PEFT adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-official", help="official Activation Beacon checkpoint -> PEFT adapter folder")
    conv.add_argument("src", help="official checkpoint folder (config.json with beacon_* fields)")
    conv.add_argument("--out", required=True, help="adapter folder to write")
    conv.add_argument("--base-out", default=None, help="also write the base model (without beacons) here")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --out/--base-out (never the source, nor a folder holding it)")
    sub.add_parser("demo", help="needle in held-out essays on SmolLM2-135M (offline); see `beacon-peft demo -h`",
                   add_help=False)
    sub.add_parser("ask", help="read FILE once, answer each -q QUESTION from a fork of its memory; see "
                   "`beacon-peft ask -h`", add_help=False)
    sub.add_parser("chat", help="a conversation over FILE on stdin/stdout (/save DIR, /quit); see "
                   "`beacon-peft chat -h`", add_help=False)
    sub.add_parser("serve", help="a vLLM server answering from saved memories (beacon-peft-serve of the serving "
                   "environment, scripts/serve_setup.sh); see docs/serving.md", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] in (["ask"], ["chat"], ["demo"]):
        from .logs import quiet_console

        quiet_console()
    if argv[:1] in (["ask"], ["chat"]):
        from .reuse_cli import main as reuse_main

        return reuse_main(argv[0], argv[1:])
    if argv[:1] == ["demo"]:
        from .offline.demo import main as demo

        return demo(argv[1:])
    args = parser.parse_args(argv)

    from .convert import convert_official

    try:
        config = convert_official(args.src, args.out, args.base_out, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        print(f"beacon-peft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote adapter {args.out} (window={config.window}, ratios={config.ratios}, placement={config.placement},"
          f" scope={config.attention_scope}, sink={config.sink_size})")
    if args.base_out:
        print(f"wrote base model {args.base_out}")
    return 0


def _serve(argv: Sequence[str]) -> int:
    """``beacon-peft serve ARGS``: ``beacon-peft-serve ARGS`` here when this environment has vLLM, else the serving
    environment's (``.venv-serve`` of the checkout, made by ``scripts/serve_setup.sh``)."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("vllm") is not None:
        from beacon_peft_serve.cli import main as serve

        return serve(argv)
    serve = Path(__file__).resolve().parents[1] / ".venv-serve" / "bin" / "beacon-peft-serve"
    if not serve.exists():
        print(f"beacon-peft serve: error: vLLM is not installed here and there is no serving environment at "
              f"{serve.parents[1]}: run `bash scripts/serve_setup.sh` (docs/serving.md)", file=sys.stderr)
        return 2
    os.execv(str(serve), [str(serve), *argv])


if __name__ == "__main__":
    raise SystemExit(main())
