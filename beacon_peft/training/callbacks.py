"""Trainer callbacks of a beacon run: compression-ratio sampling and recording, time limit, base-LoRA checkpoints.

Each callback holds the `PeftModel` it acts on (``model.base_model`` is the `BeaconModel`), not the Trainer's
wrapped copy, so it works the same under DDP and FSDP.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .modeling import lora_state_dict

LORA_CKPT_FILE = "base_lora.safetensors"  # inside Trainer checkpoints (a folder would be taken for a beacon adapter)


def step_ratio(seed: int, step: int, ratios: list[int]) -> int:
    """The ratio of optimizer step ``step`` under ``ratio_per_optimizer_step`` (a pure function of seed and step)."""
    return random.Random(f"beacon-ratio:{seed}:{step}").choice(list(ratios))


class StepRatioCallback(TrainerCallback):
    """``ratio_per_optimizer_step``: force this optimizer step's ratio on every window of every micro-batch, on every
    rank."""

    def __init__(self, model, seed: int, ratios: list[int]):
        self.model, self.seed, self.ratios = model, seed, list(ratios)

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.base_model.set_compression_ratio(step_ratio(self.seed, state.global_step, self.ratios))

    def on_train_end(self, args, state, control, **kwargs):
        self.model.base_model.set_compression_ratio(None)


class RatioRecorder(TrainerCallback):
    """Records the ratio of every window step of every training micro-batch (`BeaconModel.ratios_last_call`).

    ``history`` holds ``(global_step, ratio)`` pairs of this rank (written to ``training_log.json``); `pop_mean`
    gives the mean ratio since its previous call, which the trainer logs as ``compression_ratio``.
    """

    def __init__(self, model):
        self.model = model
        self.history: list[tuple[int, int]] = []
        self._since_log: list[int] = []

    def _record(self, state) -> None:
        ratios = [int(r) for r in self.model.base_model.ratios_last_call()]
        self.history += [(state.global_step, r) for r in ratios]
        self._since_log += ratios

    def on_substep_end(self, args, state, control, **kwargs):  # after a micro-batch that is not a step's last
        self._record(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # after a step's last micro-batch
        self._record(state)

    def pop_mean(self):
        """Mean ratio recorded since the previous call, or None when nothing was recorded."""
        ratios, self._since_log = self._since_log, []
        return sum(ratios) / len(ratios) if ratios else None


class TimeLimitCallback(TrainerCallback):
    """Stop after the first optimizer step that ends past ``minutes`` of train() wall time (rank 0's clock)."""

    def __init__(self, minutes: float):
        self.seconds, self.started = 60 * minutes, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        stop = time.perf_counter() - self.started >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from accelerate.utils import broadcast_object_list

            flag = [stop]
            broadcast_object_list(flag, from_process=0)  # every rank follows rank 0's clock: no rank hangs
            stop = flag[0]
        if stop:
            control.should_training_stop = True
        return control


class LoraCheckpointCallback(TrainerCallback):
    """Trainer checkpoints hold the beacon adapter; this adds the base LoRA next to it (`LORA_CKPT_FILE`)."""

    def __init__(self, model):
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from safetensors.torch import save_file

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                save_file(lora_state_dict(self.model), str(folder / LORA_CKPT_FILE), metadata={"format": "pt"})


def optimizer_step_seed(beacon_args, training_args) -> int:
    """The seed of ``ratio_per_optimizer_step``: ``optimizer_step_ratio_seed``, else the run's ``seed``."""
    seed = beacon_args.optimizer_step_ratio_seed
    return training_args.seed if seed is None else seed


def make_callbacks(model, script_args, beacon_args, training_args, model_args) -> list[TrainerCallback]:
    """The callbacks a run needs; the `RatioRecorder` is always first."""
    callbacks: list[TrainerCallback] = [RatioRecorder(model)]
    if script_args.max_train_minutes is not None:
        callbacks.append(TimeLimitCallback(script_args.max_train_minutes))
    if beacon_args.ratio_per_optimizer_step:
        callbacks.append(StepRatioCallback(model, optimizer_step_seed(beacon_args, training_args), beacon_args.ratios))
    if model_args.use_lora:
        callbacks.append(LoraCheckpointCallback(model))
    return callbacks
