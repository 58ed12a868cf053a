"""The read-back stage's outputs: a resumable checkpoint (``checkpoint/``: the training state and the adapter as a
loadable folder) and the final adapter (``final/``), each replaced atomically (`beacon_peft.atomic.write_dir`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ...atomic import write_dir
from .modeling import base_lora_config

STATE_FILE = "state.pt"  # in <output_dir>/checkpoint: what `load_checkpoint` restores


def _write_adapter(model, tokenizer, args, folder: Path, step: int, tokens: int) -> None:
    """The adapter (a PEFT folder), its tokenizer and ``readback_args.json`` (the run's arguments, with the
    ``step`` and ``tokens`` it reached) into ``folder``."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if args.base_lora_r:  # a standard PEFT LoRA folder of the base, where `load_trained` looks for it
        from beacon_peft.training.modeling import LORA_DIR, write_lora

        base_name = model.peft_config["default"].base_model_name_or_path
        write_lora(model, folder / LORA_DIR, base_lora_config(args, base_name))
    record = args.record()
    (folder / "readback_args.json").write_text(json.dumps(record | {"step": step, "tokens": tokens}, indent=1))


def save_checkpoint(model, optimizer, step: int, tokens: int, out: Path, tokenizer=None, args=None) -> None:
    """Adapter + optimizer + counters + RNG states into ``out/checkpoint/state.pt``, replacing the previous
    checkpoint atomically (`beacon_peft.atomic.write_dir`). With ``tokenizer`` and ``args``,
    ``out/checkpoint/adapter`` is also the checkpoint's adapter as a loadable folder (like ``final/``), so a run
    killed between checkpoints can be evaluated or exported (`recipes/export_readback.py RUN/checkpoint/adapter`)
    without resuming it."""
    from peft import get_peft_model_state_dict

    from beacon_peft.training.modeling import lora_state_dict

    state = {"adapter": get_peft_model_state_dict(model), "base_lora": lora_state_dict(model),
             "optimizer": optimizer.state_dict(), "step": step, "tokens": tokens, "rng": random.getstate(),
             "torch_rng": torch.get_rng_state()}  # tensors, numbers and containers only: see `load_checkpoint`

    def write(tmp: Path) -> None:
        torch.save(state, tmp / STATE_FILE)
        if tokenizer is not None and args is not None:
            (tmp / "adapter").mkdir()
            _write_adapter(model, tokenizer, args, tmp / "adapter", step, tokens)

    write_dir(out / "checkpoint", write, overwrite=True)


def load_checkpoint(model, optimizer, out: Path, device, base_lora: bool) -> tuple[int, int] | None:
    """Restore what `save_checkpoint` wrote into ``out/checkpoint``: the adapter (and base LoRA), the optimizer,
    Python's and torch's RNG states; returns ``(step, tokens)``, or None (restoring nothing) where ``out`` holds no
    checkpoint.

    ``state.pt`` is read with ``torch.load(weights_only=True)``: only tensors, numbers, strings and plain containers
    (dict, list, tuple) are rebuilt and nothing in the file runs code, so a checkpoint folder from elsewhere cannot
    execute anything here (a file holding any other object is refused: `pickle.UnpicklingError`). Everything the
    resume needs is of those types: the state dicts, the step and token counters, ``random.getstate()`` (a tuple of
    ints) and ``torch.get_rng_state()`` (a uint8 tensor)."""
    from peft import set_peft_model_state_dict

    path = out / "checkpoint" / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    set_peft_model_state_dict(model, state["adapter"])
    if state.get("base_lora") or base_lora:  # a mismatch (LoRA in one, not the other) is a ValueError
        from beacon_peft.training.modeling import load_lora_state_dict

        load_lora_state_dict(model, state.get("base_lora", {}))
    optimizer.load_state_dict(state["optimizer"])
    version, internal, gauss = state["rng"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"].cpu())  # the CPU generator's state, whatever map_location moved it to
    return state["step"], state["tokens"]


def write_final_adapter(model, tokenizer, args, out: Path, step: int, tokens: int) -> Path:
    """The adapter (a PEFT folder), its tokenizer and ``readback_args.json`` (the run's arguments, with the
    ``step`` and ``tokens`` it reached) into ``out/final``, replacing an earlier one atomically."""
    return write_dir(out / "final", lambda tmp: _write_adapter(model, tokenizer, args, tmp, step, tokens),
                     overwrite=True)
