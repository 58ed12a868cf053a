"""Grouped execution side by side: full attention vs the beacon adapter at several ``group_tokens`` (input tokens
per decoder pass; 16384 and 2048 are the accelerator and CPU defaults, 1 the window-by-window loop), in one
process, alternating.

Random weights of SmolLM2-135M's shape (times do not depend on the weights), fp32, sdpa. For each length every
method prefills once per repeat, methods alternating, and the minimum is kept (``measure.prefill_decode``: prefill
seconds, decode seconds per token, KV bytes, peak RSS since just before the prefill). ``--train`` also times one
training step (forward + backward of the language-modelling loss) of the CPU recipe's shape
(recipes/configs/smollm2-135m-cpu.yaml: 1024-token rows, window 256, one ratio per step from 2, 4, 8) at each
setting. Writes results/<tag>.{json,md,png}.

    python -m benchmarks.efficiency.grouping --lengths 8192 --layers 30 --repeats 3 --train --tag cpu-8k
    python -m benchmarks.efficiency.grouping --lengths 8192 32768 --layers 4 --tag cpu-8k-32k-4layers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import measure, metrics, report
from benchmarks.efficiency.launches import smollm2_shape

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


def build(layers: int, max_positions: int, window: int, ratios: list[int], tiny: bool = False):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import beacon_peft

    torch.manual_seed(0)
    config = smollm2_shape(layers, max_positions)
    if tiny:  # tests/tiny.py's sizes: what grows with the length is the method's own bookkeeping and memory
        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
        config._attn_implementation = "sdpa"
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return get_peft_model(base, beacon_peft.BeaconConfig(window=window, ratios=ratios)).eval()


@contextlib.contextmanager
def method(model, name: str):
    """``full`` (adapter disabled), ``group=N`` (group_tokens N; ``group=1`` is the window-by-window loop)."""
    config = model.peft_config["default"]
    before = config.group_tokens
    config.group_tokens = None if name == "full" else int(name.split("=")[1])
    try:
        with model.disable_adapter() if name == "full" else contextlib.nullcontext():
            yield model
    finally:
        config.group_tokens = before


def prefill(args) -> list[dict]:
    model = build(args.layers, max(args.lengths), args.window, [args.ratio], args.tiny)
    methods = ["full"] + [f"group={g}" for g in args.groups]
    ids = {n: torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in args.lengths}
    for name in methods:  # warm-up
        with method(model, name) as m:
            measure.prefill_decode(m, ids[args.lengths[0]][:2048], 1)
    best: dict[tuple[str, int], dict] = {}
    todo = [(n, rep, name) for n in args.lengths for rep in range(args.repeats) for name in methods]
    for n, _rep, name in tqdm(todo, desc="prefill", unit="run"):
        with method(model, name) as m:
            r = measure.prefill_decode(m, ids[n], args.n_decode)
        keep = best.setdefault((name, n), r)
        for key in ("prefill_s", "decode_s_per_token", "peak_rss_bytes"):
            keep[key] = min(keep[key], r[key])
    rows = []
    for (name, n), r in best.items():
        full = best[("full", n)]
        rows.append(dict(kind="prefill", method=name, tokens=n, prefill_s=r["prefill_s"],
                         prefill_vs_full=r["prefill_s"] / full["prefill_s"],
                         decode_ms=1e3 * r["decode_s_per_token"], kv_mib=r["kv_bytes"] / MIB,
                         peak_rss_mib=r["peak_rss_bytes"] / MIB, rss_before_mib=r["rss_before_bytes"] / MIB))
    return rows


def train_step(args) -> list[dict]:
    """One forward + backward of a 1024-token row, window 256, each ratio of the CPU recipe in turn."""
    model = build(args.layers, 8192, 256, [2, 4, 8])
    ids = torch.randint(0, 49152, (1, 1024), generator=torch.Generator().manual_seed(1))
    model.train()
    best: dict[str, float] = {}
    order = [f"group={g}" for g in args.groups]  # (full attention trains nothing of the adapter: no step to compare)
    for rep in tqdm(range(args.repeats + 1), desc="train steps", unit="round"):
        for name in order:
            total = 0.0
            for ratio in (2, 4, 8):
                with model.base_model.compression_ratio(ratio), method(model, name) as m:
                    t0 = time.perf_counter()
                    loss = m(input_ids=ids, labels=ids).loss
                    loss.backward()
                    total += time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
            if rep:  # the first round warms up
                best[name] = min(best.get(name, float("inf")), total / 3)
    loop = best.get("group=1")
    return [dict(kind="train step", method=name, tokens=1024, step_s=best[name],
                 step_vs_loop=best[name] / loop if loop else None) for name in order]


def markdown(args, rows: list[dict]) -> str:
    head = (f"# Grouped execution, CPU ({args.tag})\n\n- command: `python -m benchmarks.efficiency.grouping "
            f"{' '.join(sys.argv[1:])}`\n- {'tiny Llama (hidden 64)' if args.tiny else 'SmolLM2-135M shape'}, "
            f"{args.layers} layers, random weights, fp32, sdpa, "
            f"{torch.get_num_threads()} threads; {metrics.hardware_string()}; commit `{metrics.git_commit()}`\n"
            f"- beacon window {args.window}, ratio {args.ratio}; `group=N`: group_tokens N input tokens per decoder "
            f"pass (`group=1`: the window-by-window loop); {args.repeats} repeats alternating, minimum kept\n\n")
    pre = [r for r in rows if r["kind"] == "prefill"]
    table = report.markdown_table(
        ["tokens", "method", "prefill s", "prefill / full", "decode ms/tok", "KV MiB", "peak RSS MiB",
         "RSS before MiB"],
        [[report.tokens(r["tokens"]), r["method"], r["prefill_s"], r["prefill_vs_full"], r["decode_ms"], r["kv_mib"],
          r["peak_rss_mib"], r["rss_before_mib"]] for r in pre]) if pre else ""
    tr = [r for r in rows if r["kind"] == "train step"]
    train = ("\n## One training step of the CPU recipe's shape (1024 tokens, window 256, mean over ratios 2/4/8)\n\n"
             + report.markdown_table(["method", "step s", "step / loop"],
                                     [[r["method"], r["step_s"], r["step_vs_loop"]] for r in tr])) if tr else ""
    return head + table + train


def plot(rows: list[dict], out: Path) -> None:
    pre = [r for r in rows if r["kind"] == "prefill"]
    if not pre:
        return
    series = {}
    for name in dict.fromkeys(r["method"] for r in pre):
        pts = sorted((r["tokens"], r["prefill_s"]) for r in pre if r["method"] == name)
        series[name] = ([x for x, _ in pts], [y for _, y in pts])
    report.line_plot(out, series, xlabel="context tokens", ylabel="prefill (s)", title="prefill: full vs grouped "
                     "vs window loop", logy=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[8192])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-decode", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--groups", type=int, nargs="+", default=[16384, 2048, 1],
                   help="group_tokens settings to compare (1: the window loop)")
    p.add_argument("--train", action="store_true", help="also time a training step of the CPU recipe's shape")
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 64) instead of SmolLM2's shape")
    p.add_argument("--tag", default="grouping")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    rows = (prefill(args) if args.lengths else []) + (train_step(args) if args.train else [])
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = markdown(args, rows)
    (RESULTS / f"{args.tag}.md").write_text(text + "\n")
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    plot(rows, RESULTS / f"{args.tag}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
