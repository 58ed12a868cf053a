"""The model and beacon adapter ``beacon-peft ask``/``chat`` run: any causal LM the adapter fits, on any device.

Each step is a function the command calls in this order, so that every bad choice is refused (a `ValueError`
naming it) before a weight is loaded or the document is read:

* `check_device`: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` -> the device to load on; an unknown or absent
  one is refused, naming what this machine has; `check_4bit`: ``--load-in-4bit`` needs bitsandbytes and a CPU or
  CUDA device;
* `adapter_folder`: the adapter as a folder, or a Hub id downloaded with ``huggingface_hub`` (config, weights,
  tokenizer files) -> its local folder; `read_adapter_config`: its `BeaconConfig` (another PEFT type is refused);
* `base_name`: the model to load: ``--model``, else the adapter's ``base_model_name_or_path``, SmolLM2's Hub id
  mapped to the offline copy (`beacon_peft.offline.weights.resolve_base`);
* `check_fits`: the model's config (``config.json`` only) against the adapter's tensor shapes
  (`checkpoint.check_config_fits`: ``hidden_size``, ``num_hidden_layers``, heads x ``head_dim``, then every tensor),
  and its ``model_type`` against that of the adapter's recorded base when that config is on this machine;
* `load`: ``AutoModelForCausalLM.from_pretrained`` (4-bit nf4 through bitsandbytes with ``load_in_4bit``) on the
  device, the model's ``AutoTokenizer`` and ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

import torch

from .config import BeaconConfig

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ADAPTER_FILES = ["*.json", "*.safetensors", "*.bin", "*.jinja", "*.model", "*.txt"]  # incl. base_lora/


def available_devices() -> list[str]:
    """The devices of this machine, as ``--device`` names them."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name: str) -> str:
    """The device ``name`` means here (``auto``: cuda, else mps, else cpu).

    Raises:
        ValueError: not a device name, or a device this machine lacks (the message lists the ones it has).
    """
    have = available_devices()
    if name == "auto":
        return "cuda" if "cuda" in have else "mps" if "mps" in have else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: not a device; use one of {list(DEVICES)} (this machine has {have})")
    if device.type == "cpu":
        return "cpu"
    if str(device) not in have:
        raise ValueError(f"--device {name}: not available here; this machine has {have} (or auto)")
    return str(device)


def check_4bit(device: str) -> None:
    """Refuse a 4-bit load that cannot run: bitsandbytes missing, or a device other than CPU and CUDA."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install 'beacon-peft[quant]' (or pip install "
                         "bitsandbytes)")
    if torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"--load-in-4bit runs on cpu or cuda (bitsandbytes), not on {device}")


def adapter_folder(name: str) -> Path:
    """The local folder of the adapter ``name``: a folder as given, else a Hub id (``owner/name``) downloaded (the
    files an adapter has: config, weights, tokenizer files, ``base_lora/``) into the Hugging Face cache.

    Raises:
        ValueError: a folder without ``adapter_config.json``, or neither a folder nor a Hub id the Hub gives.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {name}: the folder has no adapter_config.json")
        return path
    if path.exists() or not _HUB_ID.match(name):
        raise ValueError(f"--adapter {name}: no such folder (nor a Hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=_ADAPTER_FILES))
    except Exception as err:  # offline, no such repo, no access: one clear line
        raise ValueError(f"--adapter {name}: no such folder, and the Hub did not give it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {name}: the Hub repository has no adapter_config.json")
    return folder


def read_adapter_config(folder: Path, label: Optional[str] = None) -> BeaconConfig:
    """The `BeaconConfig` of an adapter folder (``label``: how the user named it, for messages)."""
    label = label or str(folder)
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--adapter {label}: adapter_config.json is unreadable ({err})") from None
    if raw.get("peft_type") != "BEACON":
        raise ValueError(f"--adapter {label} is a {raw.get('peft_type')!r} adapter, not a beacon adapter "
                         "(peft_type 'BEACON')")
    return BeaconConfig.from_pretrained(str(folder))


def base_name(model: Optional[str], config: BeaconConfig, label: str) -> str:
    """``model`` as given, else the adapter's ``base_model_name_or_path`` (`offline.weights.resolve_base`)."""
    if model:
        return model
    recorded = config.base_model_name_or_path
    if not recorded:
        raise ValueError(f"--adapter {label} names no base model (base_model_name_or_path): give --model")
    from .offline.weights import resolve_base

    return resolve_base(recorded)


def _local_config(name: str):
    """The transformers config of ``name`` if it is on this machine (a folder, or in the Hub cache); else None."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def check_fits(model: str, folder: Path, config: BeaconConfig):
    """Refuse a model the adapter in ``folder`` does not fit, from the model's config alone; returns that config.

    Raises:
        ValueError: the config cannot be read, or the fields that differ (`checkpoint.check_config_fits`), or the
            model's ``model_type`` differs from that of the adapter's recorded base (when that one's config is
            on this machine: a folder or the Hub cache; nothing is downloaded for it).
    """
    from transformers import AutoConfig

    from .checkpoint import check_config_fits
    from .model import BeaconModel

    try:
        base_config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {model}: cannot read its config ({str(err).splitlines()[0]})") from None
    check_config_fits(folder, base_config, config, "default", BeaconModel._remove_adapter_name_from_key)
    recorded = config.base_model_name_or_path
    trained_on = _local_config(recorded) if recorded and recorded != model else None
    if trained_on is not None and trained_on.model_type != base_config.model_type:
        raise ValueError(f"--model {model} does not fit the adapter: model_type {base_config.model_type!r} vs "
                         f"{trained_on.model_type!r} of the adapter's base {recorded}")
    return base_config


def load(model: str, folder: Path, device: str, dtype: torch.dtype, load_in_4bit: bool = False):
    """``(PeftModel, tokenizer)``: ``model`` on ``device`` in ``dtype`` (4-bit nf4, double quantized, computing in
    ``dtype`` with ``load_in_4bit``), its tokenizer (left padding; eos pads if it has no pad token), the adapter
    of ``folder`` over it, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from .offline.gemma3 import GEMMA3_HUB_ID
    from .offline.weights import SMOLLM2_HUB_ID, carry_hub_id, hub_id

    # transformers' default attention: sdpa where the model has it, else eager (Gemma 2's soft-capping, gpt-oss's
    # sinks)
    kwargs = dict(dtype=dtype)
    if load_in_4bit:
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True))
    base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if not load_in_4bit:
        base = base.to(device)
    if hub_id(model) in (SMOLLM2_HUB_ID, GEMMA3_HUB_ID):  # an offline copy: what is saved from it names the Hub id
        carry_hub_id(base, hub_id(model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return PeftModel.from_pretrained(base.eval(), str(folder)).eval(), tokenizer
