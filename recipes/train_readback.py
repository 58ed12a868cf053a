"""Read-back stage: teach a beacon adapter to answer from facts held only in compressed memory.

The stage lives in `beacon_peft.training.readback` (rows, losses, the loop, checkpoints, the curve's probes;
docs/training.md, "Read-back stage"): mixed rows (plain text + synthetic retrieval rows from the training texts,
some needle phrasings held out) and a loss of up to four terms,

    loss = CE(prose) + answer_weight * CE(answers) + kl_weight * KL(full-attention base || compressed model)
           + hidden_weight * D(hidden states of every layer, compressed model vs full-attention base)

where the teacher is the frozen base with the adapter disabled. Every ``--eval_every`` steps it measures *key
information* on a fixed held-out probe and writes the curve; every ``--save_minutes`` it writes a resumable
checkpoint (adapter, optimizer, step) atomically. Every flag is a field of
`beacon_peft.training.readback.ReadbackArguments` (``--config`` YAML: defaults, the command line wins).

    python recipes/train_readback.py --config recipes/configs/readback/smollm2-135m-gpu.yaml            # GPU
    python recipes/train_readback.py --config recipes/configs/readback/smollm2-135m-gpu.yaml --resume    # continue
    python recipes/train_readback.py --config recipes/configs/readback/smollm2-135m-gpu.yaml \\
        --device cpu --dtype float32 --max_tokens 1024 --min_tokens 600 --batch_size 1 --max_steps 2   # smoke

Outputs under ``--output_dir``: ``checkpoint/`` (resume: ``state.pt``; ``adapter/``, the checkpoint's adapter as a
loadable folder), ``final/`` (the adapter: PEFT folder, loadable with
``PeftModel.from_pretrained``), ``curve.json`` (step, tokens, loss terms, key information), ``train_log.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from beacon_peft.training.readback import parse_args, train


def main(argv=None) -> Path:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the final adapter folder."""
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
