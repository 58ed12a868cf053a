"""Reference losses of the read-back stage over *full logits*: what `beacon_peft.training.readback.losses.head_losses`
computes chunk by chunk from the last hidden states must equal these (tests/test_readback.py, and on a GPU
scripts/device/smoke.py, which imports this module with ``PYTHONPATH=.:tests`` as it does `tiny`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from beacon_peft.labels import IGNORE_INDEX


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of KL(teacher || student) over the positions where ``mask`` is true, in nats.

    student, teacher: logits (B, T, V); mask: (B, T) bool. Computed in float32 over chunks of ``chunk`` positions
    so the full-vocabulary softmaxes never exist for the whole batch at once. The gradient reaches ``student``
    only. ``temperature`` softens both distributions (the sum is scaled by ``temperature**2`` as usual).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions
    s_flat = student.reshape(-1, student.shape[-1])  # (B*T, V)
    t_flat = teacher.reshape(-1, teacher.shape[-1])
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, index.numel(), chunk):
        rows = index[start : start + chunk]
        s = F.log_softmax(s_flat.index_select(0, rows).float() / temperature, dim=-1)  # (n, V)
        t = F.log_softmax(t_flat.index_select(0, rows).float().detach() / temperature, dim=-1)
        total = total + (t.exp() * (t - s)).sum()
    return total * temperature**2, torch.tensor(float(index.numel()), device=student.device)



def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of next-token cross-entropy: position ``t`` predicts ``labels[:, t + 1]``.

    logits (B, T, V), labels (B, T) with `IGNORE_INDEX` where nothing is scored.
    """
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32), torch.tensor(0.0, device=logits.device)
    picked = logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, keep).float()  # (n, V)
    loss = F.cross_entropy(picked, targets.index_select(0, keep), reduction="sum")
    return loss, torch.tensor(float(keep.numel()), device=logits.device)
