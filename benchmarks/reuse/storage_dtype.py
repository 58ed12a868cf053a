"""Accuracy cost of storing a memory in bf16: continue a document from an fp32-stored and a bf16-stored memory.

SmolLM2-135M (fp32 compute) with the shipped adapter at ratio 8 reads ``--tokens`` of held-out essays, saves the
memory with ``dtype=None`` (fp32) and ``dtype=torch.bfloat16``, loads both and feeds the next ``--tail`` tokens
through each: the max |logit difference|, the mean NLL of the tail under each, the greedy continuation agreement,
and the two file sizes. Writes ``results/storage-dtype.{json,md}``.

    python benchmarks/reuse/storage_dtype.py --tokens 2048 --tail 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--tail", type=int, default=64)
    parser.add_argument("--ratio", type=int, default=8)
    parser.add_argument("--adapter", default=str(ROOT / "adapters" / "smollm2-135m-beacon"))
    args = parser.parse_args(argv)

    from peft import PeftModel

    from beacon_peft import BeaconMemory
    from beacon_peft.offline.corpora import haystack_ids
    from beacon_peft.offline.weights import load_smollm2
    from beacon_peft.reuse import cache_kwargs, read

    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    model = PeftModel.from_pretrained(model, args.adapter).eval()
    model.base_model.set_compression_ratio(args.ratio)
    ids = torch.tensor([haystack_ids(tok, args.tokens + args.tail, "held_out")])
    ctx, tail = ids[:, : args.tokens], ids[:, args.tokens:]
    memory = read(model, ctx)
    result = dict(tokens=args.tokens, tail=args.tail, ratio=args.ratio, adapter=args.adapter)
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            memory.save(Path(tmp) / name, model, dtype=dtype)
            result[f"file_bytes_{name}"] = sum(p.stat().st_size for p in (Path(tmp) / name).iterdir())
            loaded = BeaconMemory.load(Path(tmp) / name, model)
            logits[name] = model(input_ids=tail, **cache_kwargs(model, loaded)).logits[0].float()  # (tail, V)
    nll = {k: torch.nn.functional.cross_entropy(v[:-1], tail[0, 1:]).item() for k, v in logits.items()}
    diff = (logits["fp32"] - logits["bf16"]).abs()
    result.update(max_abs_logit_diff=diff.max().item(), mean_abs_logit_diff=diff.mean().item(),
                  logit_std=logits["fp32"].std().item(), nll_fp32=nll["fp32"], nll_bf16=nll["bf16"],
                  argmax_agreement=(logits["fp32"].argmax(-1) == logits["bf16"].argmax(-1)).float().mean().item())
    out = ROOT / "benchmarks" / "reuse" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage-dtype.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"# bf16 storage of a memory (SmolLM2-135M fp32, {args.tokens} tokens, ratio {args.ratio}, next "
          f"{args.tail} tokens)\n\n"
          f"`python benchmarks/reuse/storage_dtype.py --tokens {args.tokens} --tail {args.tail}`\n\n"
          "| file fp32 MiB | file bf16 MiB | max abs logit diff | mean abs logit diff | logit std | NLL fp32 "
          "| NLL bf16 | argmax agreement |\n"
          "|---|---|---|---|---|---|---|---|\n"
          f"| {result['file_bytes_fp32'] / 2**20:.2f} | {result['file_bytes_bf16'] / 2**20:.2f} | "
          f"{result['max_abs_logit_diff']:.4f} | {result['mean_abs_logit_diff']:.5f} | {result['logit_std']:.2f} | "
          f"{nll['fp32']:.5f} | {nll['bf16']:.5f} | {result['argmax_agreement']:.4f} |\n")
    (out / "storage-dtype.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
