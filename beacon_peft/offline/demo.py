"""``beacon-peft demo``: a real run on SmolLM2-135M over held-out Paul Graham essays (everything offline).

A pass key is hidden in a held-out haystack and the model is asked for it, twice:

1. at a length full attention can read (``--native-tokens``, default 4,096 of SmolLM2's 8,192 positions): the base
   model with full attention and the beacon adapter answer the same prompt, each with the KV memory it holds, so
   the reader sees what the base itself does and what compression costs;
2. far past the native context (``--tokens``, default 32,768): only the beacon adapter can read it; the document is
   read window by window (a progress bar on stderr) and the question answered from its compressed memory.

The shipped trained adapter (``adapters/smollm2-135m-beacon`` in the repository) is used when present; otherwise a
fresh, untrained adapter (beacon projections = copies of the base ones), and the output says so.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..facts import PASS_KEY_INTRO, pass_key_fact, random_number
from ..precision import DTYPE_NAMES, resolve_dtype
from . import SHIPPED_ADAPTER as SHIPPED

ANSWER_TOKENS = 12


def _mib(n: float) -> str:
    """``n`` bytes in MiB, as the demo prints its KV memory figures."""
    return f"{n / 2**20:,.1f} MiB"


def build_parts(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[list[int], list[int], str]:
    """(document ids, question ids, key): ``n_tokens`` in all, held-out essays with the pass key at ``depth``.

    The texts are `beacon_peft.facts`': `facts.PASS_KEY_INTRO`, then the haystack with `facts.pass_key_fact`'s needle
    (a 5-digit key drawn from ``seed``), then its question."""
    from .corpora import haystack_ids

    key = random_number(random.Random(seed), 5)
    fact = pass_key_fact(key)
    needle = tokenizer.encode(fact.inserted, add_special_tokens=False)
    intro = tokenizer.encode(PASS_KEY_INTRO, add_special_tokens=False)
    question = tokenizer.encode(fact.asked, add_special_tokens=False)
    filler = haystack_ids(tokenizer, n_tokens - len(intro) - len(needle) - len(question), "held_out")
    at = int(len(filler) * depth)
    return intro + filler[:at] + needle + filler[at:], question, key


def build_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """Held-out haystack of ``n_tokens`` with a pass-key sentence at ``depth``; returns (ids, answer)."""
    document, question, key = build_parts(tokenizer, n_tokens, depth, seed)
    return document + question, key


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beacon-peft demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768,
                        help="long context, read by the beacons only (default 32768: 4x SmolLM2's 8,192 positions)")
    parser.add_argument("--native-tokens", type=int, default=4096,
                        help="context where full attention and beacons answer side by side (default 4096; "
                             "0 skips it; at most the model's 8,192 positions)")
    parser.add_argument("--ratio", type=int, default=8, help="compression ratio, one of the adapter's (default 8)")
    parser.add_argument("--window", type=int, default=1024, help="window of a fresh adapter (default 1024)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one if present)")
    parser.add_argument("--seed", type=int, default=0, help="picks the pass key (default 0)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                        help="compute dtype (default float32; auto: bfloat16 where the CPU has native bf16)")
    return parser


def _check(parser: argparse.ArgumentParser, args) -> None:
    """Every argument checked before the model loads."""
    if args.tokens < 256:
        parser.error(f"--tokens={args.tokens} is too short: use at least 256")
    if args.native_tokens and not 256 <= args.native_tokens <= 8192:
        parser.error(f"--native-tokens={args.native_tokens} must be 0 or in [256, 8192] (SmolLM2's positions)")
    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth={args.depth} must be in [0, 1]")
    adapter = Path(args.adapter) if args.adapter else SHIPPED
    if args.adapter is not None and not (adapter / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter} has no adapter_config.json")
    if (adapter / "adapter_config.json").is_file():
        ratios = json.loads((adapter / "adapter_config.json").read_text()).get("ratios", [])
        if args.ratio not in ratios:
            parser.error(f"--ratio={args.ratio} is not one of the adapter's ratios {ratios}")


def _load(parser: argparse.ArgumentParser, args):
    """SmolLM2 with the beacon adapter (shipped, given or fresh); returns (model, tokenizer, adapter line)."""
    from peft import PeftModel, get_peft_model

    from .. import BeaconConfig
    from .weights import load_smollm2

    model, tokenizer = load_smollm2(dtype=resolve_dtype(args.dtype))
    adapter = Path(args.adapter) if args.adapter else (SHIPPED if (SHIPPED / "adapter_config.json").exists() else None)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        name = adapter.name if adapter == SHIPPED else str(adapter)
        trained = f"adapter {name} (trained)"
    else:
        model = get_peft_model(model, BeaconConfig(window=args.window, ratios=[args.ratio]))
        trained = "a fresh, UNTRAINED adapter (train one with recipes/train.py)"
    config = model.peft_config["default"]
    model.eval().base_model.set_compression_ratio(args.ratio)
    return model, tokenizer, f"{trained}, window {config.window}, ratio {args.ratio}"


def _verdict(text: str, key: str) -> str:
    from ..metrics import score_answer

    return "CORRECT" if score_answer(text, key) else "wrong"


def _line(label: str, text: str, key: str, entries: int, nbytes: int, seconds: float) -> str:
    return (f"  {label:<15} {text.strip()!r:<28} -> {_verdict(text, key):<7}  KV {entries:>6,} entries = "
            f"{_mib(nbytes):>11}  ({seconds:.0f} s)")


def _full_attention(model, tokenizer, ids: list[int], per_entry: int) -> tuple[str, int, int, float]:
    """The base model alone (adapter disabled) answers the whole prompt; returns (text, entries, bytes, seconds)."""
    x = torch.tensor([ids])
    start = time.perf_counter()
    with model.disable_adapter():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=ANSWER_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    entries = out.shape[1] - 1  # the last token is never fed back
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), entries, entries * per_entry, seconds


def _beacons(model, tokenizer, document: list[int], question: list[int], bar: bool):
    """The beacon adapter reads ``document`` (progress bar on stderr when ``bar``), then answers ``question`` from a
    fork of its memory (equal to one generate over both); returns (text, memory, seconds)."""
    from tqdm.auto import tqdm

    from ..reuse import ask, read

    start = time.perf_counter()
    with tqdm(total=len(document), unit="tok", desc="  reading", file=sys.stderr, disable=not bar,
              dynamic_ncols=True, leave=False) as progress:
        memory = read(model, torch.tensor([document]), progress=progress.update)
    new, fork = ask(model, memory, torch.tensor([question]), return_memory=True, max_new_tokens=ANSWER_TOKENS,
                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True), fork, time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..metrics import kv_bytes_per_entry

    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    torch.manual_seed(args.seed)
    model, tokenizer, adapter_line = _load(parser, args)
    cfg = model.get_base_model().config
    per_entry = kv_bytes_per_entry(cfg, next(model.get_base_model().parameters()).dtype)  # K and V, every layer
    native = cfg.max_position_embeddings

    print(f"SmolLM2-135M-Instruct ({native:,} native positions) with {adapter_line}.")
    print(f"A pass key hidden at depth {args.depth:.2f} of held-out essays; the model is asked for it.")
    if args.native_tokens:
        document, question, key = build_parts(tokenizer, args.native_tokens, args.depth, args.seed)
        print(f"\n{args.native_tokens:,} tokens (within the native context), pass key {key}:")
        text, entries, nbytes, seconds = _full_attention(model, tokenizer, document + question, per_entry)
        print(_line("full attention", text, key, entries, nbytes, seconds), flush=True)
        text, memory, seconds = _beacons(model, tokenizer, document, question, bar=False)
        print(_line(f"beacons, x{args.ratio}", text, key, memory.sizes()["total"], memory.nbytes(), seconds))

    document, question, key = build_parts(tokenizer, args.tokens, args.depth, args.seed)
    where = f"{args.tokens / native:.1f}x the native context" if args.tokens > native else "within the native context"
    print(f"\n{args.tokens:,} tokens ({where}; full attention would hold"
          f" {_mib((args.tokens + ANSWER_TOKENS - 1) * per_entry)}), pass key {key}:", flush=True)
    text, memory, seconds = _beacons(model, tokenizer, document, question, bar=True)
    print(_line(f"beacons, x{args.ratio}", text, key, memory.sizes()["total"], memory.nbytes(), seconds))
    sizes = memory.sizes()
    print(f"  (the beacons' memory: sink {sizes['sink']} + beacons {sizes['comp']:,} + open window {sizes['raw']}"
          f" entries, of {sizes['tokens']:,} tokens read)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
