"""beacon_peft: Activation Beacon (arXiv 2401.03462) long-context compression as a PEFT adapter.

``import beacon_peft`` registers the ``BEACON`` adapter type, after which `peft.get_peft_model`,
`peft.PeftModel.from_pretrained` and the other PEFT entry points accept a `BeaconConfig`.
"""

from . import compat, reuse  # noqa: F401  (beacon_peft.reuse.read / ask / fork)
from .config import BeaconConfig, BeaconPeftType
from .convert import convert_official
from .memory import BeaconMemory
from .model import BeaconModel, mask_first_window_labels
from .registry import register

compat.check_versions()  # warns once when transformers lies outside the tested range
register()

__all__ = ["BeaconConfig", "BeaconMemory", "BeaconModel", "BeaconPeftType", "convert_official",
           "mask_first_window_labels", "register", "reuse"]
__version__ = "0.1.0"
