"""The attention mask of one step over ``[sink ; compressed ; raw cache ; chunk]`` (official semantics).

Full-coverage: plain causal over memory and chunk (every valid memory entry is visible). Step-expansion and
segmentation restrict what a *beacon* sees of its own window: beacon ``j`` sees raw tokens ``0 .. (j+1)r-1``
(step-expansion) or ``jr .. (j+1)r-1`` (segmentation), and among its window's beacons those up to itself
(``attend_prev``) or itself only. Entries outside the open window (sink, compressed beacons) stay visible.
"""

from __future__ import annotations

import torch

from .config import BeaconConfig
from .schedule import StepMask


def build_mask(step: StepMask, config: BeaconConfig, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, L, S + C + R + L): 0 where attention is allowed, the dtype's minimum elsewhere."""
    B, L = step.valid.shape
    S, C, R = step.widths
    device = step.valid.device
    raw_valid = torch.arange(R, device=device) < step.raw_len[:, None]  # (B, R)
    mem_valid = torch.cat(
        (
            torch.arange(S, device=device) < step.sink_len[:, None],
            torch.arange(C, device=device) < step.comp_len[:, None],
            raw_valid,
        ),
        dim=1,
    )  # (B, M)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    allowed = torch.cat(
        (mem_valid[:, None, :].expand(B, L, S + C + R), causal[None] & step.valid[:, None, :]), dim=-1
    )  # (B, L, K)
    if step.scoped:
        outside = torch.zeros(B, S + C, dtype=torch.bool, device=device)
        key_beacon = torch.cat((outside, step.mem_raw_is_beacon & raw_valid, step.is_beacon & step.valid), 1)
        key_raw = torch.cat((outside, ~step.mem_raw_is_beacon & raw_valid, ~step.is_beacon & step.valid), 1)
        key_local = torch.cat((outside.long(), step.mem_raw_local, step.local), 1)[:, None, :]  # (B, 1, K)
        q_local = step.local[:, :, None]  # (B, L, 1)
        r = step.ratio[:, None, None]
        raw_ok = key_local < (q_local + 1) * r
        if config.segmented:
            raw_ok &= key_local >= q_local * r
        beacon_ok = key_local <= q_local if config.attend_prev else key_local == q_local
        blocked = (key_raw[:, None, :] & ~raw_ok) | (key_beacon[:, None, :] & ~beacon_ok)
        allowed &= ~(step.is_beacon[:, :, None] & blocked)
    mask = torch.zeros(B, 1, L, allowed.shape[-1], dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask
