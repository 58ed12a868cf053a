"""Launch counts: aten ops dispatched by one prefill (and one training step), beacon vs full attention.

On a GPU every dispatched aten op is (at least) one kernel launch, and for a small model launches, not
multiply-adds, bound the time. This benchmark counts them on the CPU with a `TorchDispatchMode`, so the count
needs no GPU and is deterministic: every aten call of ``model(input_ids, logits_to_keep=1)`` over a random
context (views and factory calls included), for full attention (the adapter disabled) and the beacon adapter,
SmolLM2-135M's widths with ``--layers`` decoder layers (random weights), window 1024, ratio 8. ``--train``
also counts one training step (forward + backward of the language-modelling loss) of each.

    python benchmarks/efficiency/launches.py                       # 8K prefill, what an accelerator dispatches
    python benchmarks/efficiency/launches.py --group-tokens 1      # the window-by-window loop
    python benchmarks/efficiency/launches.py --path auto --group-tokens 2048   # what this CPU runs by default
    python benchmarks/efficiency/launches.py --lengths 8192 32768 --train --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (by name in ``ops``)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def smollm2_shape(layers: int, max_positions: int = 8192):
    """A SmolLM2-135M-shaped Llama config (random weights)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=max_positions,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    return config


def build(layers: int, window: int, ratio: int, group_tokens: int | None = None):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import beacon_peft

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(smollm2_shape(layers), dtype=torch.float32).eval()
    extra = {} if group_tokens is None else {"group_tokens": group_tokens}
    return get_peft_model(base, beacon_peft.BeaconConfig(window=window, ratios=[ratio], **extra)).eval()


def count_prefill(model, ids: torch.Tensor, full: bool) -> OpCounter:
    with torch.inference_mode(), model.disable_adapter() if full else contextlib.nullcontext():
        with OpCounter() as counter:
            model(input_ids=ids, logits_to_keep=1)
    return counter


def count_train_step(model, ids: torch.Tensor, full: bool) -> OpCounter:
    model.train()
    try:
        with model.disable_adapter() if full else contextlib.nullcontext():
            with OpCounter() as counter:
                loss = model(input_ids=ids, labels=ids).loss
                if loss.requires_grad:
                    loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return counter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--group-tokens", type=int, default=16384,
                   help="the adapter's group_tokens (default: an accelerator's, 16384; 1: the window loop)")
    p.add_argument("--path", choices=["masked", "auto", "split"], default="masked",
                   help="how a run of windows attends: `masked` is what an accelerator runs (default), `auto` what "
                        "this machine runs")
    p.add_argument("--train", action="store_true", help="also count one training step at each length")
    p.add_argument("--top", type=int, default=0, help="print the N most dispatched ops of each beacon count")
    p.add_argument("--out", default=None, help="write the counts as JSON")
    args = p.parse_args(argv)
    from beacon_peft.layer import BeaconAttention

    model = build(args.layers, args.window, args.ratio, args.group_tokens)
    group = model.peft_config["default"].group_tokens
    BeaconAttention.windows_path = args.path
    print(f"SmolLM2-135M widths, {args.layers} layers, window {args.window}, ratio {args.ratio}, "
          f"group_tokens {group}, windows path {args.path}, torch {torch.__version__}")
    rows = []
    kinds = [("prefill", count_prefill)] + ([("train step", count_train_step)] if args.train else [])
    for n in args.lengths:
        ids = torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(n))
        for kind, fn in kinds:
            full, beacon = fn(model, ids, True), fn(model, ids, False)
            rows.append(dict(kind=kind, tokens=n, full=full.total, beacon=beacon.total,
                             ratio=beacon.total / full.total, group_tokens=group, path=args.path, layers=args.layers))
            if args.top:
                print(f"  {kind} {n}: " + ", ".join(f"{k} {v}" for k, v in beacon.ops.most_common(args.top)))
    print("\n| run | tokens | full attention ops | beacon ops | beacon / full |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['tokens']} | {r['full']} | {r['beacon']} | {r['ratio']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
