"""Where half precision is used: the one place that decides it for the whole package.

* Weights and compute dtype (``--dtype auto|float32|bfloat16|float16`` of the demo, ``ask``/``chat``, the
  benchmarks and the read-back recipes): `resolve_dtype`. ``auto`` picks bfloat16 only where it is the fast path:
  a CUDA device that supports it, or a CPU with native bf16 instructions (AVX512-BF16 or AMX-BF16, read from
  /proc/cpuinfo). On older CPUs bf16 matrix products are emulated and several times slower than fp32, so ``auto``
  keeps float32 there.
* Mixed-precision training (``bf16``/``fp16`` autocast of the training recipe): only on a GPU
  (`autocast_off_without_gpu`), so that one YAML serves a GPU run and a CPU check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_FIXED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

logger = logging.getLogger(__name__)


def gpu_available() -> bool:
    """Whether a CUDA or XPU device is present."""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def autocast_off_without_gpu(args) -> bool:
    """Switch bf16/fp16 autocast off (``args.bf16 = args.fp16 = False``) when there is no GPU.

    ``args`` is a `transformers.TrainingArguments` (or anything with ``bf16`` and ``fp16``); ``bf16=None`` (TRL's
    "bf16 unless fp16") counts as asked for. Returns True, with a warning, when autocast was asked for and switched
    off; False when there is a GPU or nothing was asked for.
    """
    if gpu_available():
        return False
    asked = bool(args.bf16 or args.fp16 or args.bf16 is None)
    if asked:
        logger.warning("no GPU: bf16/fp16 autocast switched off (training in fp32)")
    args.bf16, args.fp16 = False, False
    return asked


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises bf16 instructions (``cpuinfo``: the text of /proc/cpuinfo; read when None)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags = set(cpuinfo.split())
    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)


def resolve_dtype(name: str, device: str | torch.device = "cpu", cpuinfo: str | None = None) -> torch.dtype:
    """The dtype ``name`` means on ``device``.

    Raises:
        ValueError: ``name`` is not one of `DTYPE_NAMES`.
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r} is not allowed: choose one of {list(DTYPE_NAMES)}")
    if name != "auto":
        return _FIXED[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16(cpuinfo) else torch.float32
    return torch.float32
