"""`BeaconCollator`: right-pads a batch of unpacked sequences for the beacon adapter."""

from __future__ import annotations

from typing import Any

import torch

from ..labels import IGNORE_INDEX
from ..model import mask_first_window_labels


class BeaconCollator:
    """Right-pads a batch; labels are `IGNORE_INDEX` on padding (and on the first window when the adapter masks it).

    The first-window masking is the adapter's own rule (`beacon_peft.mask_first_window_labels`, which the adapter
    applies again in training), done here too so that Trainer's count of loss tokens (``num_items_in_batch``)
    matches the tokens the loss is actually taken over.

    Args:
        pad_token_id (`int`): Token id written into the padding.
        window (`int`): The adapter's window (`BeaconConfig.window`).
        mask_first_window (`bool`): `BeaconConfig.masks_first_window()`.
    """

    def __init__(self, pad_token_id: int, window: int, mask_first_window: bool):
        self.pad_token_id = pad_token_id
        self.window = window
        self.mask_first_window = mask_first_window

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.as_tensor(example["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(example.get("labels") or example["input_ids"])
        if self.mask_first_window:
            labels = mask_first_window_labels(labels, mask, self.window)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
