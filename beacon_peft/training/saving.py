"""Writing a run's results: the final adapter folder, atomically.

The final folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (the beacon adapter), the tokenizer,
``README.md`` (`card.model_card`), ``training_log.json`` (the run's `card.TrainingRecord` under ``"record"``,
Trainer's log history and every compression ratio drawn) and, with a base LoRA, a standard PEFT LoRA adapter of
the base in ``base_lora/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomic import write_dir
from .card import TRAINING_LOG, TrainingRecord, model_card
from .modeling import LORA_DIR, hub_name, save_lora

logger = logging.getLogger(__name__)


def save_final(trainer, final_dir: Path, model_args, base_name: str) -> None:
    """Write the final adapter atomically (all ranks call this; the main process writes)."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        record = TrainingRecord.from_trainer(trainer, trainer.card_info)
        card = model_card(trainer, trainer.card_info, record)

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp), state_dict=state_dict)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(str(tmp))
            if model_args.use_lora:
                save_lora(model, tmp / LORA_DIR, model_args, hub_name(base_name))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            (tmp / TRAINING_LOG).write_text(json.dumps(
                {"record": record.to_json(), "log_history": trainer.state.log_history,
                 "ratio_history": [list(x) for x in trainer.ratio_history]}, indent=1) + "\n")

        write_dir(final_dir, write, overwrite=True)  # an interruption leaves the previous folder or the new one
        logger.warning("final adapter written to %s", final_dir)
    trainer.accelerator.wait_for_everyone()
