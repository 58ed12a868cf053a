"""Grouped execution on a lent GPU, in one call (scripts/device/grouped.sh runs it; about 8 minutes on an H200).

Random weights (times and memory do not depend on them), bf16, sdpa, one sequence unless said:

(a) ``prefill``: prefill and decode time, full attention vs beacon (ratio 8, window 1024) at the default
    ``group_tokens`` (``grouped``) and at one window per pass (``loop``), for SmolLM2-135M's shape and
    Llama-3-8B's shape, at each ``--lengths`` (minimum over ``--repeats``, methods alternating);
(b) ``qlora``: one training step (forward + backward) of Llama-3-8B's shape with a 4-bit nf4 base
    (bitsandbytes), beacon adapter (rank-128 q/k/v deltas, window 2048, ratio 2, gradient checkpointing) vs a
    rank-16 LoRA on full attention, at 8K and 32K tokens: seconds, tokens/s, peak GPU memory;
(c) ``readback``: the read-back stage's step (SmolLM2-135M's shape, window 512, ratio 8, sink 1, 4K-token
    rows, bf16 base and fp32 adapter, forward + backward) in tokens/s at growing batch sizes until memory runs
    out, grouped vs loop: what sizes the GPU training run that retrieval still needs.

Each part prints a markdown table and appends its rows to ``--out`` (JSON lines). ``--device cpu --quick`` is a
dry run of every part on tiny sizes (tests/test_device_scripts.py).

    python scripts/device/grouped.py --parts prefill qlora readback --out $OUT/grouped.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

from benchmarks.common.measure import prefill_decode  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, rope_theta=10000.0, tie_word_embeddings=False),
}
METHODS = ("full", "grouped", "loop")


def log(rows: list[dict], out: str | None) -> None:
    if out:
        with open(out, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


def base_model(shape: str, device: str, max_positions: int, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def use(model, method: str, default: int):
    config = model.peft_config["default"]
    config.group_tokens = 1 if method == "loop" else default
    try:
        with model.disable_adapter() if method == "full" else contextlib.nullcontext():
            yield model
    finally:
        config.group_tokens = default


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def part_prefill(args) -> list[dict]:
    from peft import get_peft_model

    import beacon_peft

    rows = []
    for shape in args.shapes:
        model = get_peft_model(base_model(shape, args.device, max(args.lengths)),
                               beacon_peft.BeaconConfig(window=args.window, ratios=[8])).eval()
        default = model.peft_config["default"].group_tokens
        vocab = SHAPES[shape]["vocab_size"]
        for n in args.lengths:
            ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            best: dict[str, dict] = {}
            for method in METHODS:  # warm-up
                with use(model, method, default) as m:
                    prefill_decode(m, ids[: min(n, 4096)], 2, device=args.device)
            for _ in range(args.repeats):
                for method in METHODS:
                    reset_peak(args.device)
                    with use(model, method, default) as m:
                        r = prefill_decode(m, ids, args.n_decode, device=args.device)
                    r["peak_gpu_bytes"] = peak(args.device)
                    keep = best.setdefault(method, r)
                    for key in ("prefill_s", "decode_s_per_token", "peak_gpu_bytes"):
                        keep[key] = min(keep[key], r[key])
            for method, r in best.items():
                rows.append(dict(part="prefill", shape=shape, tokens=n, method=method, prefill_s=r["prefill_s"],
                                 prefill_vs_full=r["prefill_s"] / best["full"]["prefill_s"],
                                 decode_ms=1e3 * r["decode_s_per_token"], kv_mib=r["kv_bytes"] / 2**20,
                                 peak_gib=r["peak_gpu_bytes"] / 2**30))
            print(table([r for r in rows if r["shape"] == shape and r["tokens"] == n]), flush=True)
        del model
        reset_peak(args.device)
    return rows


def quantize_linears(model, device: str):
    """Replace every Linear of the decoder layers by a bitsandbytes nf4 ``Linear4bit`` (QLoRA's base)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                    setattr(parent, name, q.to(device))
                    del child
    return model


def train_step(model, ids: torch.Tensor, device: str) -> tuple[float, int]:
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds, peak(device)


def part_qlora(args) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    import beacon_peft

    shape = "tiny" if args.quick else "llama3-8b"
    lengths = [512, 1024] if args.quick else [8192, 32768]
    rows = []
    for kind in ("beacon", "lora-full"):
        base = base_model(shape, "cpu", max(lengths))  # quantized on the way to the device
        base = quantize_linears(base, args.device)
        base.to(args.device)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        if kind == "beacon":
            config = beacon_peft.BeaconConfig(window=256 if args.quick else 2048, ratios=[2], beacon_rank=128)
        else:
            config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                task_type="CAUSAL_LM")
        model = get_peft_model(base, config).train()
        for n in lengths:
            ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, n), device=args.device)
            train_step(model, ids[:, : min(n, 1024)], args.device)  # warm-up
            try:
                seconds, peak_bytes = train_step(model, ids, args.device)
                rows.append(dict(part="qlora", shape=shape, tokens=n, method=kind, step_s=seconds,
                                 tokens_per_s=n / seconds, peak_gib=peak_bytes / 2**30))
            except torch.OutOfMemoryError:
                rows.append(dict(part="qlora", shape=shape, tokens=n, method=kind, step_s=None, tokens_per_s=None,
                                 peak_gib="out of memory"))
        del model, base
        reset_peak(args.device)
    print(table(rows), flush=True)
    return rows


def part_readback(args) -> list[dict]:
    from peft import get_peft_model

    import beacon_peft

    shape = "tiny" if args.quick else "smollm2-135m"
    n = 512 if args.quick else 4096
    base = base_model(shape, args.device, 8192)
    model = get_peft_model(base, beacon_peft.BeaconConfig(window=128 if args.quick else 512, ratios=[8],
                                                          sink_size=1)).train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    default = model.peft_config["default"].group_tokens
    rows = []
    for method in ("grouped", "loop"):
        batch = 1
        while batch <= args.max_batch:
            ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, n), device=args.device)
            try:
                with use(model, method, default) as m:
                    train_step(m, ids, args.device)  # warm-up
                    seconds, peak_bytes = train_step(m, ids, args.device)
            except torch.OutOfMemoryError:
                rows.append(dict(part="readback", method=method, batch=batch, tokens=n, tokens_per_s=None,
                                 peak_gib="out of memory"))
                reset_peak(args.device)
                break
            rows.append(dict(part="readback", method=method, batch=batch, tokens=n, step_s=seconds,
                             tokens_per_s=batch * n / seconds, peak_gib=peak_bytes / 2**30))
            if method == "loop" and batch >= 8:
                break  # the loop is launch-bound: its throughput hardly moves with the batch
            batch *= 2
    print(table(rows), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["prefill", "qlora", "readback"],
                   choices=["prefill", "qlora", "readback"])
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3-8b"], choices=list(SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-decode", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--device", default="cuda", help="cpu: a dry run (times mean nothing there)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of the script)")
    p.add_argument("--out", default=None, help="append the rows here as JSON lines")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("grouped.py times a CUDA device; none is visible (use --device cpu --quick for a dry run)")
    if args.device == "cuda":
        print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    for part in args.parts:
        t0 = time.perf_counter()
        rows = globals()[f"part_{part}"](args)
        log(rows, args.out)
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
