"""What other libraries print that does not apply to a beacon model, filtered at its source.

* transformers' ``MaxLengthCriteria`` logs "the current text generation call has exceeded the model's predefined
  maximum length" once a generated sequence is longer than ``max_position_embeddings``. With beacons the positions
  are re-based onto the compressed memory (the model never sees a position beyond its native range), so the
  reminder is wrong: `NativeLengthReminderFilter` drops it inside a `PeftModel` call (``generate``/``forward``) with
  an active beacon adapter, and lets it through for any other model and for the base (adapter disabled or unloaded).
  transformers logs it once per process (``warning_once``), so a filtered reminder is not repeated later either.
* bitsandbytes logs, at import (and importing PEFT imports it), that an optional CPU 4-bit kernel package
  (``kernels``) is missing; it then uses its own kernels. `quiet_import_notices` raises that one logger's level to
  ERROR unless the application has set a level for it.
* `quiet_console` is for the ``beacon-peft`` commands only: it also hides PEFT's deprecation warning about
  ``is_gradient_checkpointing`` (raised by PEFT itself for any adapter on transformers >= 5.24) and transformers'
  weight-loading progress bar, so a command prints progress, answers and figures.
"""

from __future__ import annotations

import logging
import warnings
from contextvars import ContextVar

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
STOPPING_CRITERIA_LOGGER = "transformers.generation.stopping_criteria"
NATIVE_LENGTH_REMINDER = "exceeded the model's predefined maximum length"

beacon_call: ContextVar[bool] = ContextVar("beacon_peft_beacon_call", default=False)
"""True inside a `PeftModel` call with an active beacon adapter (set by `BeaconModel._enable_peft_forward_hooks`)."""


class NativeLengthReminderFilter(logging.Filter):
    """Drops transformers' native-length reminder while generation runs through beacons (positions re-based)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (beacon_call.get() and NATIVE_LENGTH_REMINDER in record.getMessage())


def install_filters() -> None:
    """Idempotent: attach `NativeLengthReminderFilter` to transformers' stopping-criteria logger."""
    logger = logging.getLogger(STOPPING_CRITERIA_LOGGER)
    if not any(isinstance(f, NativeLengthReminderFilter) for f in logger.filters):
        logger.addFilter(NativeLengthReminderFilter())


def quiet_import_notices() -> None:
    """Before PEFT is imported: bitsandbytes' notice about the optional ``kernels`` package goes (level unset only)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def quiet_console() -> None:
    """For the ``beacon-peft`` commands: no PEFT deprecation warning, no weight-loading progress bar."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
