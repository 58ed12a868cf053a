"""`BeaconSFTTrainer` and `train`, the whole run behind ``recipes/train.py``.

`train` validates the arguments, fixes the `SFTConfig` settings a beacon run needs, loads and tokenizes the data,
builds the model, trains with `BeaconSFTTrainer` and writes the final adapter atomically (`saving.save_final`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

from trl import SFTTrainer

from ..labels import IGNORE_INDEX
from ..precision import autocast_off_without_gpu, gpu_available
from .arguments import BeaconArguments, ModelArguments, ScriptArguments, validate_args
from .callbacks import LORA_CKPT_FILE, RatioRecorder, make_callbacks
from .card import card_info, model_card
from .collator import BeaconCollator
from .data import load_documents, tokenize_dataset
from .modeling import build_model, cast_trainable, load_lora_state_dict, load_tokenizer
from .saving import save_final

logger = logging.getLogger(__name__)


class BeaconSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` that logs the compression ratio (mean since the last log line, as ``compression_ratio``)
    and writes the beacon model card.

    Needs a `callbacks.RatioRecorder` among its callbacks; ``ratio_history`` is its ``(global_step, ratio)`` list.
    """

    card_info: Optional[dict] = None  # set by `train` (`card.card_info`)
    final_dir: Optional[Path] = None

    @property
    def ratio_recorder(self) -> RatioRecorder:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RatioRecorder):
                return callback
        raise ValueError("BeaconSFTTrainer needs a RatioRecorder callback")

    @property
    def ratio_history(self) -> list[tuple[int, int]]:
        return self.ratio_recorder.history

    def log(self, logs, start_time=None):
        if "loss" in logs:
            ratio = self.ratio_recorder.pop_mean()
            if ratio is not None:
                logs["compression_ratio"] = ratio
        super().log(logs, start_time)

    equal_window_steps: bool = False  # set by `train` when the model is sharded per decoder layer
    group_tokens: Optional[int] = None  # the adapter's decoder-pass budget (set by `train`)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.equal_window_steps:
            inputs = equalize_window_steps(inputs, self.processing_class.pad_token_id, self.group_tokens)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def create_accelerator_and_postprocess(self):
        with fsdp_without_gpu():
            super().create_accelerator_and_postprocess()

    def create_model_card(self, *args, **kwargs):
        if self.card_info is not None and self.is_world_process_zero():
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / "README.md").write_text(model_card(self, self.card_info), encoding="utf-8")


def prepare_training_args(training_args) -> None:
    """Fix the `SFTConfig` settings a beacon run needs (in place)."""
    if autocast_off_without_gpu(training_args):  # arguments built without `BeaconSFTConfig`
        training_args.mixed_precision = "no"
    # unpacked batches of custom columns go straight to the collator
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if training_args.include_num_input_tokens_seen in ("no", False, None):
        training_args.include_num_input_tokens_seen = "non_padding"
    if training_args.ddp_find_unused_parameters is None:
        # safe whatever parameters a batch leaves without a gradient (e.g. an adapter variant's unused projections)
        training_args.ddp_find_unused_parameters = True


def resolve_resume(value, output_dir: str) -> Optional[str]:
    """``--resume_from_checkpoint`` as a folder: true/last -> the latest ``checkpoint-*`` of ``output_dir``."""
    if value in (None, "", False):
        return None
    if isinstance(value, str) and value.lower() in ("false", "no", "none"):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "last")):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"resume_from_checkpoint=true but {output_dir} has no checkpoint-* folder")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint={value!r} is not a folder")
    return value


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


def train(script_args: ScriptArguments, beacon_args: BeaconArguments, training_args, model_args: ModelArguments,
          command: str = "") -> BeaconSFTTrainer:
    """Train and save; returns the trainer (``trainer.final_dir`` is the saved adapter folder).

    ``command`` is the command line shown in the model card.
    """
    from transformers import set_seed

    config = validate_args(script_args, beacon_args, training_args, model_args)
    prepare_training_args(training_args)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args, training_args)
    with training_args.main_process_first(desc="loading and tokenizing the training data"):
        documents = load_documents(script_args, training_args.dataset_text_field, tokenizer,
                                   training_args.max_length, training_args.seed)
        train_dataset = tokenize_dataset(documents, tokenizer, script_args, training_args, config,
                                         num_proc=training_args.dataset_num_proc)

    model = build_model(model_args, beacon_args, training_args, config)
    trainer = BeaconSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=BeaconCollator(tokenizer.pad_token_id, config.window, config.masks_first_window()),
        callbacks=make_callbacks(model, script_args, beacon_args, training_args, model_args),
    )
    trainer.equal_window_steps = sharded_per_layer(training_args)
    trainer.group_tokens = config.pass_tokens(training_args.device)
    cast_trainable(model, beacon_args.beacon_dtype)  # after SFTTrainer, which casts a 4-bit model's to bf16
    trainer.card_info = card_info(script_args, beacon_args, training_args, model_args, config, model,
                                  len(documents), train_dataset, command, resume)
    if resume and model_args.use_lora:
        lora_file = Path(resume) / LORA_CKPT_FILE
        if not lora_file.is_file():
            raise ValueError(f"{resume} has no {LORA_CKPT_FILE}: it was not written by a --use_lora run")
        from safetensors.torch import load_file

        load_lora_state_dict(model, load_file(str(lora_file)))

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.card_info.update(wall_time_s=time.perf_counter() - started, train_loss=result.training_loss)
    model.base_model.set_compression_ratio(None)

    trainer.final_dir = Path(script_args.final_dir or Path(training_args.output_dir) / "final")
    save_final(trainer, trainer.final_dir, model_args, model_args.model_name_or_path)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer
