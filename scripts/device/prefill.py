"""Prefill and decode time on a lent GPU: full attention vs Activation Beacon on a SmolLM2-135M-shaped model.

Random weights (no model file travels; times do not depend on the weights), bf16, sdpa, one sequence. For each
length, full attention (the adapter disabled) and beacon ratio 8 (window 1024, the efficiency benchmark's
default) alternate ``--repeats`` times and the minimum is kept (``benchmarks.common.measure.prefill_decode``):
prefill seconds, decode seconds per token over the kept cache, KV bytes held and peak GPU memory. Prints a
markdown table with beacon / full ratios; with ``--out FILE`` also writes the rows as JSON.

    PYTHONPATH=.:tests python scripts/device/prefill.py --lengths 8192 32768 131072
"""

import argparse
import contextlib
import json
import sys

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import beacon_peft
from benchmarks.common.measure import prefill_decode

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--n-decode", type=int, default=32)
p.add_argument("--window", type=int, default=1024)
p.add_argument("--ratio", type=int, default=8)
p.add_argument("--layers", type=int, default=30,
               help="decoder layers (SmolLM2-135M: 30; fewer only to test the script)")
p.add_argument("--out", default=None)
p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (times mean nothing there)")
args = p.parse_args()
dev = args.device
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("prefill.py times a CUDA device; none is visible")
config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, rms_norm_eps=1e-5)  # SmolLM2-135M's shape
config._attn_implementation = "sdpa"
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(dev).eval()
model = get_peft_model(base, beacon_peft.BeaconConfig(window=args.window, ratios=[args.ratio])).eval()
name = torch.cuda.get_device_name(0) if dev == "cuda" else dev
print(f"device {name}, torch {torch.__version__}, bf16, sdpa, window {args.window}, "
      f"ratio {args.ratio}", flush=True)
rows = []
for n in args.lengths:
    ids = torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    best: dict[str, dict] = {}
    prefill_decode(model, ids[: min(n, 2048)], 2, device=dev)  # warm-up (kernels, allocator)
    for _ in range(args.repeats):
        for method in ("full", "beacon"):
            with model.disable_adapter() if method == "full" else contextlib.nullcontext():
                r = prefill_decode(model, ids, args.n_decode, device=dev)
            r.setdefault("peak_gpu_bytes", 0)  # on CUDA only
            kept = best.setdefault(method, r)
            for key in ("prefill_s", "decode_s_per_token", "peak_gpu_bytes"):
                kept[key] = min(kept[key], r[key])
    f, b = best["full"], best["beacon"]
    rows.append(dict(tokens=n, full=f, beacon=b))
    print(f"{n} tokens: prefill full {f['prefill_s']:.3f}s beacon {b['prefill_s']:.3f}s "
          f"({b['prefill_s'] / f['prefill_s']:.2f}x); decode {1e3 * f['decode_s_per_token']:.2f} vs "
          f"{1e3 * b['decode_s_per_token']:.2f} ms/token; KV {f['kv_bytes'] / 2**20:.1f} vs "
          f"{b['kv_bytes'] / 2**20:.1f} MiB; peak GPU {f['peak_gpu_bytes'] / 2**30:.2f} vs "
          f"{b['peak_gpu_bytes'] / 2**30:.2f} GiB", flush=True)
print("\n| tokens | prefill full (s) | prefill beacon (s) | beacon / full | decode full (ms/tok) | decode beacon "
      "(ms/tok) | KV full (MiB) | KV beacon (MiB) | peak GPU full (GiB) | peak GPU beacon (GiB) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    f, b = r["full"], r["beacon"]
    print(f"| {r['tokens']} | {f['prefill_s']:.3f} | {b['prefill_s']:.3f} | {b['prefill_s'] / f['prefill_s']:.2f} | "
          f"{1e3 * f['decode_s_per_token']:.2f} | {1e3 * b['decode_s_per_token']:.2f} | {f['kv_bytes'] / 2**20:.1f} | "
          f"{b['kv_bytes'] / 2**20:.1f} | {f['peak_gpu_bytes'] / 2**30:.2f} | {b['peak_gpu_bytes'] / 2**30:.2f} |")
if args.out:
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
