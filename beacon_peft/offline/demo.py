"""``beacon-peft demo``: a real run on SmolLM2-135M over held-out Paul Graham essays (everything offline).

It hides a pass key in a long held-out haystack, reads it through a beacon adapter window by window, asks for
the key, and prints the answer with the KV memory the beacons hold next to what full attention would hold.
The shipped trained adapter (``adapters/smollm2-135m-beacon`` in the repository) is used when present;
otherwise a fresh, untrained adapter (beacon projections = copies of the base ones) and the output says so.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..compat import output_cache
from ..precision import DTYPE_NAMES, resolve_dtype
from . import SHIPPED_ADAPTER as SHIPPED


def _mib(n: float) -> str:
    """``n`` bytes in MiB, as the demo prints its KV memory figures."""
    return f"{n / 2**20:,.1f} MiB"


def build_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """Held-out haystack of ``n_tokens`` with a pass-key sentence at ``depth``; returns (ids, answer)."""
    from .corpora import haystack_ids

    key = str(random.Random(seed).randint(10000, 99999))
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    intro = tokenizer.encode("There is a pass key hidden in the text below. Find it and memorize it.\n\n",
                             add_special_tokens=False)
    question = tokenizer.encode("\n\nWhat is the pass key? The pass key is", add_special_tokens=False)
    filler = haystack_ids(tokenizer, n_tokens - len(intro) - len(needle) - len(question), "held_out")
    at = int(len(filler) * depth)
    return intro + filler[:at] + needle + filler[at:] + question, key


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="beacon-peft demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768,
                        help="context length (default 32768: 4x SmolLM2's 8,192 native positions)")
    parser.add_argument("--ratio", type=int, default=8, help="compression ratio (default 8)")
    parser.add_argument("--window", type=int, default=1024, help="window of a fresh adapter (default 1024)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                        help="compute dtype (default float32; auto: bfloat16 where the CPU has native bf16)")
    args = parser.parse_args(argv)
    if args.tokens < 256:
        parser.error(f"--tokens={args.tokens} is too short: use at least 256")
    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth={args.depth} must be in [0, 1]")

    from peft import PeftModel, get_peft_model

    from .. import BeaconConfig
    from .weights import load_smollm2

    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype)
    model, tokenizer = load_smollm2(dtype=dtype)
    adapter = Path(args.adapter) if args.adapter else (SHIPPED if (SHIPPED / "adapter_config.json").exists() else None)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        print(f"adapter: {adapter} (trained)")
    else:
        model = get_peft_model(model, BeaconConfig(window=args.window, ratios=[args.ratio]))
        print("adapter: fresh and UNTRAINED (beacon projections are copies of the base ones); "
              "train one with recipes/train.py")
    model.eval()
    config = model.peft_config["default"]
    if args.ratio not in config.ratios:
        parser.error(f"--ratio={args.ratio} is not one of the adapter's ratios {config.ratios}")
    model.base_model.set_compression_ratio(args.ratio)

    ids, answer = build_prompt(tokenizer, args.tokens, args.depth, args.seed)
    input_ids = torch.tensor([ids])
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out.sequences[0, len(ids) :], skip_special_tokens=True)
    memory = output_cache(out)

    cfg = model.base_model.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_entry = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize  # K and V
    total = len(ids) + out.sequences.shape[1] - len(ids) - 1
    sizes = memory.sizes()
    print(f"context: {len(ids)} tokens of held-out essays (model's native positions: {cfg.max_position_embeddings}),"
          f" pass key at depth {args.depth:.2f}")
    elapsed = time.strftime("%M:%S", time.gmtime(seconds))
    print(f"window {config.window}, ratio {args.ratio}, {str(dtype).removeprefix('torch.')}: {elapsed} "
          "to read and answer")
    correct = re.search(rf"(?<!\d){answer}(?!\d)", text) is not None
    print(f"answer: {text.strip()!r}   expected: {answer}   -> {'CORRECT' if correct else 'wrong'}")
    print(f"KV memory held with beacons : {sizes['total']:>6} entries "
          f"(sink {sizes['sink']} + beacons {sizes['comp']} + open window {sizes['raw']}) = {_mib(memory.nbytes())}")
    print(f"KV memory of full attention : {total:>6} entries = {_mib(total * per_entry)}"
          f"  ({total * per_entry / max(memory.nbytes(), 1):.1f}x more)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
