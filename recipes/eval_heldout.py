"""Held-out LM loss of a beacon adapter at fixed compression ratios, against the untrained adapter and the base.

The text is the held-out Paul Graham essays of `beacon_peft.offline` (never trained on): ``--n_sequences``
consecutive pieces of ``--length`` tokens of `haystack_ids(tokenizer, n * length, "held_out")`. For each ratio
the adapter is forced to it with ``set_compression_ratio``. Reported per model and ratio: the mean next-token loss
over all predicted tokens, and over the tokens after the first window (the only ones that read compressed memory).

    python recipes/eval_heldout.py --adapter outputs/smollm2-135m-beacon-cpu/final --ratios 4 8 \
        --n_sequences 4 --length 2048 --out outputs/smollm2-135m-beacon-cpu/heldout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import beacon_peft  # noqa: F401  (registers the BEACON adapter type)
from beacon_peft import BeaconConfig, offline


def sequence_losses(model, ids: torch.Tensor, window: int) -> tuple[float, float, int, int]:
    """(sum of losses over all predictions, sum after the first window, counts) for one (1, L) sequence."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")  # prediction of token t+1 from tokens <= t
    after = nll[window:]  # predictions of tokens window+1 .. L-1: their context includes a completed window
    return nll.sum().item(), after.sum().item(), nll.numel(), after.numel()


def evaluate(model, sequences: list[torch.Tensor], window: int) -> dict:
    totals = [0.0, 0.0, 0, 0]
    start = time.perf_counter()
    for ids in sequences:
        for i, value in enumerate(sequence_losses(model, ids, window)):
            totals[i] += value
    return {"loss_all": totals[0] / totals[2], "loss_after_first_window": totals[1] / totals[3],
            "tokens_all": totals[2], "tokens_after_first_window": totals[3],
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="trained beacon adapter folder")
    parser.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--ratios", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--n_sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip_base", action="store_true", help="do not evaluate the base model (full attention)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = BeaconConfig.from_pretrained(args.adapter)
    base_path = args.base or config.base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    stream = offline.haystack_ids(tokenizer, args.n_sequences * args.length, "held_out")
    sequences = [torch.tensor([stream[i * args.length : (i + 1) * args.length]]) for i in range(args.n_sequences)]

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="sdpa").eval()

    results = {"adapter": str(args.adapter), "base": str(base_path), "window": config.window,
               "n_sequences": args.n_sequences, "length": args.length, "text": "held-out essays (HELD_OUT_ESSAYS)",
               "models": {}}
    if not args.skip_base:
        results["models"]["base (full attention, no compression)"] = evaluate(load_base(), sequences, config.window)
        print(json.dumps(results["models"], indent=1), flush=True)
    fresh = BeaconConfig(**{k: v for k, v in config.to_dict().items()
                            if k in BeaconConfig.__dataclass_fields__ and k not in ("peft_type", "inference_mode")})
    candidates = {"untrained adapter": lambda: get_peft_model(load_base(), fresh).eval(),
                  "trained adapter": lambda: PeftModel.from_pretrained(load_base(), args.adapter).eval()}
    for name, build in candidates.items():
        model = build()
        for ratio in args.ratios:
            model.base_model.set_compression_ratio(ratio)
            results["models"][f"{name}, ratio {ratio}"] = evaluate(model, sequences, config.window)
            print(name, ratio, json.dumps(results["models"][f"{name}, ratio {ratio}"]), flush=True)
        del model
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
