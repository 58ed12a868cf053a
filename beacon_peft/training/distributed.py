"""Work-arounds for several processes, kept apart from the trainer that uses them.

* `use_cpu_for_multiprocess_without_gpu`: ``torchrun``/``accelerate launch --multi_gpu`` without a GPU sets up gloo.
* `fsdp_without_gpu`: accelerate enables FSDP only for accelerator-backed process groups; torch's FSDP2 runs on CPU
  processes with gloo, so the state accelerate builds is turned into an FSDP one while the `Accelerator` is made.
* `sharded_per_layer` / `equalize_window_steps`: with layers sharded across processes every layer call is a
  collective, so every process must make as many decoder passes as the one with the longest batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

from ..labels import IGNORE_INDEX
from ..precision import gpu_available

logger = logging.getLogger(__name__)


def use_cpu_for_multiprocess_without_gpu() -> None:
    """Several processes (``torchrun`` / ``accelerate launch --multi_gpu``) but no GPU: make Trainer set up a
    gloo process group on the CPU (``accelerate launch --cpu`` itself starts a single process). Call it before
    the arguments are parsed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not gpu_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # accelerate 1.15 sets DeepSpeed up only for accelerator-backed processes (docs/training.md)
            logger.warning("no GPU: accelerate does not run DeepSpeed on CPU processes; training with DDP over gloo "
                           "instead of the DeepSpeed config")


def sharded_per_layer(training_args) -> bool:
    """Several processes with the decoder layers' parameters sharded across them (FSDP, DeepSpeed ZeRO-3): every
    call of a layer gathers its parameters, a collective all processes must take part in."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or getattr(training_args, "fsdp", None):
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or training_args.deepspeed:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" or is_deepspeed_zero3_enabled()
    return False


def equalize_window_steps(inputs: dict, pad_token_id: int, group_tokens: Optional[int] = None) -> dict:
    """Make this process's micro-batch run as many decoder passes as the longest one of any process.

    The adapter calls every decoder layer once per group of window steps (at most ``group_tokens`` input tokens per
    pass), and the number of passes follows the batch's longest sequence. With the layers' parameters sharded across
    processes (FSDP, DeepSpeed ZeRO-3) every layer call is a collective (all-gather, and a reduce-scatter in
    backward), so processes running different numbers of passes issue mismatched collectives: gloo aborts
    ("Received data size doesn't match expected size"), NCCL hangs. When the longest sequence of any process (one
    ``all_reduce``) fits in one pass, every process makes exactly one and the batch is left as it is. Otherwise a
    process whose batch is shorter than the longest gets one extra *dummy row* of that length: pad tokens the
    attention mask counts as real (so the adapter runs windows over them) and labels `IGNORE_INDEX` (no loss, no
    gradient). The real rows are right-padded as usual, so their outputs, loss and gradients are those of the batch
    without the dummy row; only the batch is one row larger on those steps.
    """
    import torch
    import torch.distributed as dist

    unknown = set(inputs) - {"input_ids", "attention_mask", "labels"}
    if unknown:
        raise ValueError(f"cannot equalize the window steps of a batch with {sorted(unknown)}")
    ids = inputs["input_ids"]
    length = torch.tensor([ids.shape[1]], dtype=torch.long, device=ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    longest = int(length.item())
    if longest <= ids.shape[1] or (group_tokens is not None and longest <= group_tokens):
        return inputs
    extra, pad_id = longest - ids.shape[1], pad_token_id
    out = dict(inputs)
    out["input_ids"] = torch.cat([torch.nn.functional.pad(ids, (0, extra), value=pad_id),
                                  ids.new_full((1, longest), pad_id)])
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    out["attention_mask"] = torch.cat([torch.nn.functional.pad(mask, (0, extra)), mask.new_ones((1, longest))])
    if "labels" in inputs:
        labels = inputs["labels"]
        out["labels"] = torch.cat([torch.nn.functional.pad(labels, (0, extra), value=IGNORE_INDEX),
                                   labels.new_full((1, longest), IGNORE_INDEX)])
    return out


def fsdp_requested_without_gpu() -> bool:
    """Several processes, no GPU, and ``accelerate launch`` asked for FSDP (``distributed_type: FSDP``)."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not gpu_available()
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


@contextlib.contextmanager
def fsdp_without_gpu():
    """Let accelerate set up FSDP over gloo on the CPU while the `Accelerator` is created.

    accelerate 1.15 enables FSDP only for accelerator-backed process groups (CUDA, XPU, NPU, ...): with CPU
    processes (``MULTI_CPU``) it ignores the FSDP plugin and the run silently trains with DDP. torch's FSDP2
    (``fully_shard``) itself runs on the CPU with gloo, so when FSDP was asked for and there is no GPU this turns
    the state accelerate just built into an FSDP one (distributed type and plugin), as accelerate does for a GPU.
    A no-op otherwise.
    """
    if not fsdp_requested_without_gpu():
        yield
        return
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            logger.warning("no GPU: FSDP%s over gloo on the CPU (%s processes)", plugin.fsdp_version,
                           self.num_processes)

    accelerate_state.AcceleratorState.__init__ = init
    try:
        yield
    finally:
        accelerate_state.AcceleratorState.__init__ = original
