"""Held-out LM loss of a beacon adapter at fixed compression ratios, against the untrained adapter and the base.

The text is the held-out Paul Graham essays of `beacon_peft.offline.corpora` (never trained on). For each ratio the
adapter is forced to it with ``set_compression_ratio``. Reported per model and ratio: the mean next-token loss over
all predicted tokens, and over the tokens after the first window (the only ones that read compressed memory).
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

import torch

from ..config import BeaconConfig
from ..metrics import sequence_losses


def evaluate(model, sequences: list[torch.Tensor], window: int) -> dict:
    """Mean losses of ``model`` over ``sequences`` (each (1, L)), with token counts and wall time."""
    totals = [0.0, 0.0, 0, 0]
    start = time.perf_counter()
    for ids in sequences:
        for i, value in enumerate(sequence_losses(model, ids, window)):
            totals[i] += value
    return {"loss_all": totals[0] / totals[2], "loss_after_first_window": totals[1] / totals[3],
            "tokens_all": totals[2], "tokens_after_first_window": totals[3],
            "seconds": round(time.perf_counter() - start, 1)}


def heldout_sequences(tokenizer, n_sequences: int, length: int) -> list[torch.Tensor]:
    """``n_sequences`` consecutive (1, ``length``) pieces of ``haystack_ids(tokenizer, n * length, "held_out")``."""
    from ..offline.corpora import haystack_ids

    stream = haystack_ids(tokenizer, n_sequences * length, "held_out")
    return [torch.tensor([stream[i * length : (i + 1) * length]]) for i in range(n_sequences)]


def untrained_config(config: BeaconConfig) -> BeaconConfig:
    """A fresh config with the same settings (for the untrained adapter: copies of the base projections)."""
    return BeaconConfig(**{k: v for k, v in config.to_dict().items()
                           if k in BeaconConfig.__dataclass_fields__ and k not in ("peft_type", "inference_mode")})


def compare_heldout(adapter: str, ratios: list[int], n_sequences: int = 4, length: int = 2048,
                    base: Optional[str] = None, skip_base: bool = False,
                    report: Callable[[str], None] = print) -> dict:
    """Held-out losses of the base (full attention), the untrained adapter and the trained one at each ratio.

    ``base`` defaults to the adapter's ``base_model_name_or_path`` (SmolLM2's Hub id: the offline copy, see
    `beacon_peft.offline.weights.resolve_base`); ``report`` gets a line per result.
    """
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..offline.weights import resolve_base

    config = BeaconConfig.from_pretrained(adapter)
    base_path = base or (config.base_model_name_or_path and resolve_base(config.base_model_name_or_path))
    sequences = heldout_sequences(AutoTokenizer.from_pretrained(base_path), n_sequences, length)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="sdpa").eval()

    results = {"adapter": str(adapter), "base": str(base_path), "window": config.window, "n_sequences": n_sequences,
               "length": length, "text": "held-out essays (HELD_OUT_ESSAYS)", "models": {}}
    if not skip_base:
        name = "base (full attention, no compression)"
        results["models"][name] = evaluate(load_base(), sequences, config.window)
        report(f"{name} {json.dumps(results['models'][name])}")
    candidates = {"untrained adapter": lambda: get_peft_model(load_base(), untrained_config(config)).eval(),
                  "trained adapter": lambda: PeftModel.from_pretrained(load_base(), adapter).eval()}
    for name, build in candidates.items():
        model = build()
        for ratio in ratios:
            model.base_model.set_compression_ratio(ratio)
            key = f"{name}, ratio {ratio}"
            results["models"][key] = evaluate(model, sequences, config.window)
            report(f"{key} {json.dumps(results['models'][key])}")
        del model
    return results
