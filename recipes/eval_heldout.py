"""Held-out LM loss of a beacon adapter at fixed compression ratios, against the untrained adapter and the base.

The text is the held-out Paul Graham essays of `beacon_peft.offline.corpora` (never trained on): ``--n_sequences``
consecutive pieces of ``--length`` tokens. Reported per model and ratio: the mean next-token loss over all
predictions and over those after the first window (see `beacon_peft.training.evaluation`).

    python recipes/eval_heldout.py --adapter outputs/smollm2-135m-beacon-cpu/final --ratios 4 8 \
        --n_sequences 4 --length 2048 --out outputs/smollm2-135m-beacon-cpu/heldout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from beacon_peft.training import compare_heldout  # importing beacon_peft registers the BEACON adapter type


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="trained beacon adapter folder")
    parser.add_argument("--base", default=None,
                        help="base model folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--ratios", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--n_sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip_base", action="store_true", help="do not evaluate the base model (full attention)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = compare_heldout(args.adapter, args.ratios, args.n_sequences, args.length, base=args.base,
                              skip_base=args.skip_base, report=lambda line: print(line, flush=True))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
