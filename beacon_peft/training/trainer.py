"""`BeaconSFTTrainer` and `train`, the whole run behind ``recipes/train.py``.

`train` validates the arguments, fixes the `SFTConfig` settings a beacon run needs, loads and tokenizes the data,
builds the model, trains with `BeaconSFTTrainer` and writes the final adapter atomically (`saving.save_final`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from trl import SFTTrainer

from ..atomic import refuse_earlier_run
from ..forward import pass_budget
from ..precision import autocast_off_without_gpu
from ..support import decoder_of
from .arguments import BeaconArguments, ModelArguments, ScriptArguments, validate_args
from .callbacks import LORA_CKPT_FILE, RatioRecorder, make_callbacks
from .card import card_info, model_card
from .collator import BeaconCollator
from .data import load_documents, tokenize_dataset
from .distributed import equalize_window_steps, fsdp_without_gpu, sharded_per_layer
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


def earlier_run(output_dir: str, final_dir: Optional[str]) -> list[str]:
    """What ``output_dir`` holds of an earlier run: its ``checkpoint-*`` folders and a non-empty final adapter."""
    out = Path(output_dir)
    final = Path(final_dir) if final_dir else out / "final"
    found = sorted(p.name for p in out.glob("checkpoint-*")) if out.is_dir() else []
    return found + ([str(final)] if final.is_dir() and any(final.iterdir()) else [])


def train(script_args: ScriptArguments, beacon_args: BeaconArguments, training_args, model_args: ModelArguments,
          command: str = "") -> BeaconSFTTrainer:
    """Train and save; returns the trainer (``trainer.final_dir`` is the saved adapter folder).

    ``command`` is the command line shown in the model card.
    """
    from transformers import set_seed

    config = validate_args(script_args, beacon_args, training_args, model_args)
    prepare_training_args(training_args)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is None and not script_args.overwrite_output_dir:
        refuse_earlier_run(training_args.output_dir, earlier_run(training_args.output_dir, script_args.final_dir),
                           "--resume_from_checkpoint", "--overwrite_output_dir true")

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
    trainer.group_tokens = pass_budget(config, decoder_of(model.get_base_model()).rotary_emb, training_args.device)
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
