"""Train an Activation Beacon adapter (arXiv 2401.03462) with TRL's `SFTTrainer`.

One script for every setting: CPU smoke runs, single-GPU QLoRA, multi-GPU (DDP / FSDP) through `accelerate`.
Only the beacon parameters train (beacon projections of the attention and the beacon embedding: full copies, or
with ``--beacon_rank`` low-rank deltas on the frozen base projections), optionally with a LoRA on the frozen base
(``--use_lora``). The loss is the adapter's compression-based LM loss: every window of ``--window`` raw tokens is
condensed into beacons at a ratio drawn from ``--ratios``, and the following tokens are predicted from the
compressed memory. The logic lives in `beacon_peft.training`; docs/training.md describes every option.

Commands (run from the repository root)::

    # CPU smoke test: SmolLM2-135M (offline copy) on the bundled training essays, a few steps
    python recipes/train.py --config recipes/configs/smollm2-135m-cpu.yaml

    # one GPU, 4-bit base (QLoRA-style), Llama-3-8B pre-training stage (low-rank: estimated to fit 24 GB at 16K)
    python recipes/train.py --config recipes/configs/llama3-8b-pretrain-qlora.yaml
    python recipes/train.py --config recipes/configs/llama3-8b-pretrain-qlora-lowrank.yaml

    # several GPUs
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml \
        recipes/train.py --config recipes/configs/llama3-8b-pretrain.yaml
    accelerate launch --config_file recipes/configs/accelerate/fsdp.yaml \
        recipes/train.py --config recipes/configs/qwen2.5-7b-pretrain.yaml

    # any option on the command line overrides the YAML; resume an interrupted run
    python recipes/train.py --config recipes/configs/smollm2-135m-cpu.yaml --resume_from_checkpoint true

Outputs: Trainer checkpoints in ``output_dir/checkpoint-*`` and the final adapter in ``output_dir/final``
(``--final_dir``), written atomically with a model card (README.md), ``training_log.json``, the tokenizer and, with
``--use_lora``, the base LoRA in ``final/base_lora``. Load it with ``PeftModel.from_pretrained(base, "…/final")``,
or `beacon_peft.training.load_trained` with a base LoRA.

Compression-ratio sampling: ``--ratio_mix`` is the adapter's own (`BeaconConfig.ratio_mix`: ``step-random`` one
ratio per window step, the official default; ``instance-random`` one per sequence; ``fixed``; ``adapt``), and
``--ratio_per_optimizer_step true`` forces one ratio per optimizer step instead, a pure function of
``--optimizer_step_ratio_seed``/``--seed`` and the step, logged as ``compression_ratio``. Every adapter argument
has `BeaconConfig`'s name, default and allowed values; all modes are reproducible and resume exactly.
"""

from __future__ import annotations

import logging
import shlex
import sys
from typing import Optional

from beacon_peft.training import parse_args, train, use_cpu_for_multiprocess_without_gpu


def main(argv: Optional[list[str]] = None):
    """Parse ``argv`` (default ``sys.argv[1:]``; ``--config file.yaml`` supplies defaults), train, save."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    use_cpu_for_multiprocess_without_gpu()  # before parsing: the SFTConfig sets up the process group
    script_args, beacon_args, training_args, model_args = parse_args(argv)  # the library's parser and checks
    command = shlex.join(["python", "recipes/train.py", *(sys.argv[1:] if argv is None else argv)])
    return train(script_args, beacon_args, training_args, model_args, command=command)


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits, as torch.distributed asks: left to the exit,
    a gloo process group's threads can abort the process after training finished (seen once under FSDP2 on a busy
    CPU: SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    finally:
        close_process_group()
