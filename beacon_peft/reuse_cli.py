"""``beacon-peft ask`` and ``beacon-peft chat``: read a long document once, then answer many questions.

``ask FILE -q QUESTION [-q ...]`` reads FILE into a beacon memory (window by window, with a progress bar on
stderr) or loads one saved earlier (``--memory DIR``), answers every question from a fork of that memory (no
question sees another; ``--sealed``: from the sealed memory, what a server answering from the saved memory computes),
and prints the time to read, the time per answer and the KV memory held against what
full attention would hold. ``--save-memory DIR`` keeps the memory for later runs.

``chat FILE`` is a conversation over the document on stdin/stdout (works in a pipe): each line is a turn, and
turns flow into the memory, so later turns see earlier ones. ``/save DIR`` saves the memory, ``/quit`` ends.

Any causal LM with a beacon adapter for it: ``--adapter`` (a folder or a Hub id; default the shipped SmolLM2-135M
adapter ``adapters/smollm2-135m-beacon``), ``--model`` (a Hub id or folder; default the adapter's
``base_model_name_or_path``, whose SmolLM2 Hub id means the offline copy), ``--device`` and ``--load-in-4bit``
(bitsandbytes nf4). Every argument, and the model's config against the adapter's weights, is checked before
anything is loaded or read (`beacon_peft.loading`): a bad one ends with exit status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .offline import SHIPPED_ADAPTER as SHIPPED
from .precision import DTYPE_NAMES


class UsageError(ValueError):
    """A bad argument, reported as ``beacon-peft <cmd>: error: ...`` with exit status 2."""


def _parser(prog: str, chat: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=" ".join(
        __doc__.split("\n\n")[i].replace("\n", " ") for i in ((2 if chat else 1), 3)))
    add = parser.add_argument
    add("file", nargs="?", help="text file to read (optional with --memory)")
    if not chat:
        add("-q", "--question", action="append", default=[], help="a question (repeatable)")
    add("--memory", type=Path, default=None, metavar="DIR", help="load a memory saved earlier instead of reading FILE")
    add("--save-memory", type=Path, default=None, metavar="DIR", help="save the memory read from FILE to this folder")
    add("--adapter", default=None, metavar="DIR_OR_HUB_ID", help="beacon adapter: a folder or a Hub id owner/name "
        f"(default: {SHIPPED.relative_to(SHIPPED.parents[1])}, for SmolLM2-135M-Instruct)")
    add("--model", default=None, metavar="HUB_ID_OR_DIR", help="base model: a Hub id or a folder (default: the "
        "adapter's base_model_name_or_path; SmolLM2's Hub id loads the offline copy)")
    add("--device", default="auto", metavar="DEVICE", help="cpu, cuda, cuda:N, mps or auto (default: cuda if "
        "available, else mps, else cpu)")
    add("--load-in-4bit", action="store_true", help="load the base in 4 bits (bitsandbytes nf4; cpu or cuda; needs "
        "pip install 'beacon-peft[quant]')")
    add("--ratio", type=int, default=8, metavar="R", help="compression ratio, one of the adapter's (default 8)")
    add("--max-new-tokens", type=int, default=64, metavar="N", help="longest answer in tokens (default 64)")
    add("--dtype", default="float32", choices=list(DTYPE_NAMES),
        help="weights and compute dtype (default float32; auto: bfloat16 where it is fast)")
    if not chat:
        add("--sealed", action="store_true", help="answer from the sealed memory: the rest of the open window is read "
            "without beacons, as a plain decoder serving the memory as a KV prefix reads it (beacon-peft-serve; "
            "docs/serving.md)")
    add("--no-template", action="store_true", help="plain 'Question: ... Answer:' turns instead of the tokenizer's "
        "chat template")
    return parser


def _read_document(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return text


def _check_args(args, chat: bool) -> str | None:
    """Every argument checked before anything loads, the model's config against the adapter's weights last
    (``args`` gains ``device``, ``adapter_dir``, ``adapter_config`` and ``model``, resolved); returns the
    document's text (None with --memory), read only once all else passed."""
    from . import loading
    from .memory_file import check_target, is_saved_memory

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not chat:
        if not args.question:
            raise UsageError("give at least one question with -q QUESTION")
        empty = [i + 1 for i, q in enumerate(args.question) if not q.strip()]
        if empty:
            raise UsageError(f"question {empty[0]} is empty: every -q needs some text")
    if args.memory is not None:
        if args.file is not None:
            raise UsageError("give FILE or --memory DIR, not both (the memory already holds its document)")
        if args.save_memory is not None:
            raise UsageError("--save-memory saves a memory read from FILE; with --memory it is already saved")
        if not args.memory.exists():
            raise UsageError(f"--memory {args.memory}: no such folder")
        if not is_saved_memory(args.memory):
            raise UsageError(f"--memory {args.memory} is not a saved beacon memory (no valid memory.json)")
    elif args.file is None:
        raise UsageError("give a text FILE to read (or --memory DIR)")
    elif Path(args.file).is_dir():
        raise UsageError(f"{args.file} is a folder: give a text file (or --memory DIR for a saved memory)")
    elif not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    if args.save_memory is not None:
        try:
            check_target(args.save_memory)
        except ValueError as err:
            raise UsageError(f"--save-memory: {err}") from None
    try:
        args.device = loading.check_device(args.device)
        if args.load_in_4bit:
            loading.check_4bit(args.device)
        if args.adapter is None and not SHIPPED.is_dir():
            raise UsageError("give --adapter (a folder or a Hub id): the shipped adapter is in a checkout of the "
                             "repository, not in the installed package")
        label = args.adapter or str(SHIPPED)
        args.adapter_dir = loading.adapter_folder(label)
        args.adapter_config = loading.read_adapter_config(args.adapter_dir, label)
        ratios = args.adapter_config.ratios
        if args.ratio not in ratios:
            raise UsageError(f"--ratio={args.ratio} is not one of the adapter's ratios {ratios}")
        args.model = loading.base_name(args.model, args.adapter_config, label)
        loading.check_fits(args.model, args.adapter_dir, args.adapter_config)  # config only: no weights loaded
    except (ValueError, RuntimeError) as err:  # RuntimeError: the offline SmolLM2 cannot be converted here
        raise UsageError(str(err)) from None
    return None if args.memory is not None else _read_document(Path(args.file))


def _load(args):
    from .loading import load
    from .precision import resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device)
    start = time.perf_counter()
    model, tokenizer = load(args.model, args.adapter_dir, args.device, dtype, load_in_4bit=args.load_in_4bit)
    model.base_model.set_compression_ratio(args.ratio)
    print(f"loaded {args.model}{' (4-bit nf4)' if args.load_in_4bit else ''} with adapter {args.adapter_dir} on "
          f"{args.device}, {str(dtype).replace('torch.', '')}, in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return model, tokenizer


def _kv_line(model, memory) -> str:
    from .metrics import kv_bytes_per_entry

    per_entry = kv_bytes_per_entry(model.get_base_model().config, memory.kv_tensors()[0].dtype)
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
            chat.read_ids(torch.tensor([ids], device=model.device), progress=bar.update)
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
    memory = chat.memory.sealed() if args.sealed else chat.memory
    for i, question in enumerate(args.question, 1):
        start = time.perf_counter()
        prompt = torch.tensor([chat.format.prompt(question)], device=chat.model.device)
        answer = ask(chat.model, memory, prompt, **chat.generate_kwargs)  # from a fork: memory unchanged
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
    import torch

    try:
        with torch.no_grad():
            return (ask_main if command == "ask" else chat_main)(list(argv or []))
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"beacon-peft {command}: error: {err}", file=sys.stderr)
        return 2
