"""beacon_peft: Activation Beacon (arXiv 2401.03462) long-context compression as a PEFT adapter.

``import beacon_peft`` registers the ``BEACON`` adapter type, after which `peft.get_peft_model`,
`peft.PeftModel.from_pretrained` and the other PEFT entry points accept a `BeaconConfig`.
"""

from . import logs

logs.quiet_import_notices()  # before PEFT (and with it bitsandbytes) is imported

from . import compat, reuse  # noqa: E402, F401  (beacon_peft.reuse.read / ask)
from .config import BeaconConfig, BeaconPeftType  # noqa: E402
from .convert import convert_official  # noqa: E402
from .memory import BeaconMemory  # noqa: E402
from .model import BeaconModel, mask_first_window_labels  # noqa: E402
from .registry import register  # noqa: E402

compat.check_versions()  # warns once when transformers lies outside the tested range
register()
logs.install_filters()  # transformers' native-length reminder does not apply to beacon generation

__all__ = ["BeaconConfig", "BeaconMemory", "BeaconModel", "BeaconPeftType", "convert_official",
           "mask_first_window_labels", "register", "reuse"]
__version__ = "0.1.0"
