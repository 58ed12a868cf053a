"""``beacon-peft ask`` and ``beacon-peft chat``: read a long document once, then answer many questions.

``ask FILE -q QUESTION [-q ...]`` reads FILE into a beacon memory (window by window, with a progress bar on
stderr) or loads one saved earlier (``--memory DIR``), answers every question from a fork of that memory (no
question sees another), and prints the time to read, the time per answer and the KV memory held against what
full attention would hold. ``--save-memory DIR`` keeps the memory for later runs.

``chat FILE`` is a conversation over the document on stdin/stdout (works in a pipe): each line is a turn, and
turns flow into the memory, so later turns see earlier ones. ``/save DIR`` saves the memory, ``/quit`` ends.

Both run offline on SmolLM2-135M-Instruct with the shipped adapter (``adapters/smollm2-135m-beacon``) by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .offline import SHIPPED_ADAPTER as SHIPPED


class UsageError(ValueError):
    """A bad argument, reported as ``beacon-peft <cmd>: error: ...`` with exit status 2."""


def _parser(prog: str, chat: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[2 if chat else 1].replace("\n", " "))
    parser.add_argument("file", nargs="?", help="text file to read (optional with --memory)")
    if not chat:
        parser.add_argument("-q", "--question", action="append", default=[], help="a question (repeatable)")
    parser.add_argument("--memory", type=Path, default=None, help="load a memory saved earlier instead of reading FILE")
    parser.add_argument("--save-memory", type=Path, default=None, help="save the memory read from FILE to this folder")
    parser.add_argument("--adapter", type=Path, default=None, help=f"beacon adapter folder (default: {SHIPPED})")
    parser.add_argument("--ratio", type=int, default=8, help="compression ratio, one of the adapter's (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="compute dtype (default float32)")
    parser.add_argument("--no-template", action="store_true", help="plain 'Question: ... Answer:' turns instead of "
                        "the tokenizer's chat template")
    return parser


def _check_args(args, chat: bool) -> str | None:
    """Every argument checked before the model loads; returns the document's text (None with --memory)."""
    from .memory_file import check_target, is_saved_memory

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not chat:
        if not args.question:
            raise UsageError("give at least one question with -q QUESTION")
        empty = [i + 1 for i, q in enumerate(args.question) if not q.strip()]
        if empty:
            raise UsageError(f"question {empty[0]} is empty: every -q needs some text")
    adapter = args.adapter or SHIPPED
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter} has no adapter_config.json")
    ratios = json.loads((adapter / "adapter_config.json").read_text()).get("ratios", [])
    if args.ratio not in ratios:
        raise UsageError(f"--ratio={args.ratio} is not one of the adapter's ratios {ratios}")
    if args.memory is not None:
        if args.file is not None:
            raise UsageError("give FILE or --memory DIR, not both (the memory already holds its document)")
        if args.save_memory is not None:
            raise UsageError("--save-memory saves a memory read from FILE; with --memory it is already saved")
        if not args.memory.exists():
            raise UsageError(f"--memory {args.memory}: no such folder")
        if not is_saved_memory(args.memory):
            raise UsageError(f"--memory {args.memory} is not a saved beacon memory (no valid memory.json)")
        return None
    if args.file is None:
        raise UsageError("give a text FILE to read (or --memory DIR)")
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"{path} is empty")
    if args.save_memory is not None:
        try:
            check_target(args.save_memory)
        except ValueError as err:
            raise UsageError(f"--save-memory: {err}") from None
    return text


def _load(args):
    import torch
    from peft import PeftModel

    import beacon_peft  # noqa: F401  (registers the BEACON adapter type)

    from .offline.weights import load_smollm2
    from .precision import resolve_dtype

    model, tokenizer = load_smollm2(dtype=resolve_dtype(args.dtype))
    model = PeftModel.from_pretrained(model, args.adapter or SHIPPED).eval()
    model.base_model.set_compression_ratio(args.ratio)
    torch.set_grad_enabled(False)
    return model, tokenizer


def _kv_line(model, memory) -> str:
    cfg = model.get_base_model().config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = memory.kv_tensors()[0].element_size()
    per_entry = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize
    s = memory.sizes()
    full = s["tokens"] * per_entry
    return (f"KV held: {s['total']:,} entries (sink {s['sink']} + beacons {s['comp']:,} + open window {s['raw']}) = "
            f"{memory.nbytes() / 2**20:,.1f} MiB; full attention: {s['tokens']:,} entries = {full / 2**20:,.1f} MiB "
            f"({full / max(memory.nbytes(), 1):.1f}x more)")


def _start(args, text, chat_cls):
    """Load the model, then read the document (progress bar on stderr) or load the memory; returns the chat."""
    from tqdm.auto import tqdm

    from .memory import BeaconMemory

    model, tokenizer = _load(args)
    chat = chat_cls(model, tokenizer, use_template=False if args.no_template else None,
                    max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    if args.memory is not None:
        chat.memory = BeaconMemory.load(args.memory, model)
        if chat.format.templated:  # the saved memory opens with the document as a user message
            chat.format.messages = [{"role": "user", "content": "(document)"}]
        print(f"loaded memory {args.memory} ({chat.memory.sizes()['tokens']:,} tokens) in "
              f"{time.perf_counter() - start:.2f} s", flush=True)
    else:
        import torch

        ids = chat.format.document(text)
        n = len(ids)
        with tqdm(total=n, unit="tok", desc="reading", file=sys.stderr, dynamic_ncols=True) as bar:
            chat.read_ids(torch.tensor([ids]), progress=bar.update)
        chat.transcript.append({"role": "document", "file": str(args.file), "tokens": n})
        print(f"read {args.file}: {n:,} tokens in {time.perf_counter() - start:.1f} s", flush=True)
        if args.save_memory is not None:
            chat.memory.save(args.save_memory, model)
            print(f"saved memory to {args.save_memory}", flush=True)
    print(_kv_line(model, chat.memory), flush=True)
    return chat


def ask_main(argv: Sequence[str]) -> int:
    import torch

    from .chat import Chat
    from .reuse import ask

    args = _parser("beacon-peft ask", chat=False).parse_args(argv)
    text = _check_args(args, chat=False)
    chat = _start(args, text, Chat)
    for i, question in enumerate(args.question, 1):
        start = time.perf_counter()
        prompt = torch.tensor([chat.format.prompt(question)])
        answer = ask(chat.model, chat.memory, prompt, **chat.generate_kwargs)  # from a fork: memory unchanged
        seconds = time.perf_counter() - start
        print(f"\nQ{i}: {question}\nA{i}: {chat.tokenizer.decode(answer[0], skip_special_tokens=True).strip()}\n"
              f"({seconds:.2f} s, {answer.shape[1]} tokens)", flush=True)
    return 0


def chat_main(argv: Sequence[str]) -> int:
    from .chat import Chat

    args = _parser("beacon-peft chat", chat=True).parse_args(argv)
    text = _check_args(args, chat=True)
    chat = _start(args, text, Chat)
    interactive = sys.stdin.isatty()
    print("type a question; /save DIR saves the memory, /quit ends", flush=True)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line.startswith("/save"):
            target = line[len("/save"):].strip()
            if not target:
                print("error: /save needs a folder: /save DIR", flush=True)
                continue
            try:
                chat.save(target)
                print(f"saved memory ({chat.memory.sizes()['tokens']:,} tokens) to {target}", flush=True)
            except ValueError as err:
                print(f"error: {err}", flush=True)
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]!r}: /save DIR or /quit", flush=True)
            continue
        start = time.perf_counter()
        answer = chat.say(line)
        print(f"assistant: {answer}\n({time.perf_counter() - start:.2f} s; memory {chat.entries():,} entries for "
              f"{chat.memory.sizes()['tokens']:,} tokens)", flush=True)
    return 0


def main(command: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ask`` or ``chat``; bad arguments and foreign memories end with exit status 2 and one line."""
    try:
        return (ask_main if command == "ask" else chat_main)(list(argv or []))
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"beacon-peft {command}: error: {err}", file=sys.stderr)
        return 2
