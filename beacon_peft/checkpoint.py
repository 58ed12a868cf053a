"""Check a saved beacon adapter against a model *before* anything is injected.

`PeftModel.from_pretrained` and `PeftModel.load_adapter` inject an adapter from its config first and load its
weights afterwards; a weights file that is corrupt, truncated, incomplete or made for another model would then
fail (or only warn) after the base model was already wrapped. `BeaconConfig.from_pretrained` records the local
folder it was read from, and `BeaconModel.inject_adapter` calls `check_adapter_weights` with it, so such a file
is refused while the base model is still untouched. Only tensor headers are read (no tensor data).

`check_config_fits` does the same against a base model's *config* alone (no weights): the fields the adapter's
tensor shapes fix (``hidden_size``, ``num_hidden_layers``, heads x ``head_dim``) are compared first and named when
they differ, then every tensor against a copy of the base built on the meta device. ``beacon-peft ask``/``chat``
call it before loading anything (`beacon_peft.loading`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from . import anatomy, metrics
from .config import PROJECTIONS

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def saved_shapes(folder: str | Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The weights file of an adapter folder and the shape of every tensor it holds (headers only).

    Raises:
        FileNotFoundError: the folder holds neither ``adapter_model.safetensors`` nor ``adapter_model.bin``.
        ValueError: the file is corrupt or truncated.
    """
    folder = Path(folder)
    path = folder / SAFETENSORS_NAME
    try:
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # validates the header against the file size
                return path, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        path = folder / BIN_NAME
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            return path, {k: tuple(v.shape) for k, v in state.items()}
    except Exception as err:  # safetensors / pickle errors: one clear type for the user
        raise ValueError(f"adapter weights file {str(path)!r} is corrupt or truncated ({err}): re-save or "
                         "re-download the adapter") from err
    raise FileNotFoundError(f"adapter folder {str(folder)!r} holds no {SAFETENSORS_NAME} or {BIN_NAME}")


def projection_shapes(attn: nn.Module, config, with_projections: bool) -> dict[tuple[str, str], tuple[int, ...]]:
    """Shapes of the beacon parameters `BeaconAttention.update_layer` creates for one attention module, keyed by
    (container, parameter): ``("beacon_q", "weight")``, ``("beacon_k", "A.weight")``, ..."""
    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    if not with_projections:
        return shapes
    parts = anatomy.find(attn)
    for p in config.beacon_projections:
        out_f, in_f = parts.in_out(attn, p)
        if config.beacon_rank is not None:
            shapes[(f"beacon_{p}", "A.weight")] = (config.beacon_rank, in_f)
            shapes[(f"beacon_{p}", "B.weight")] = (out_f, config.beacon_rank)
            continue
        shapes[(f"beacon_{p}", "weight")] = (out_f, in_f)
        if parts.has_bias(attn, p):
            shapes[(f"beacon_{p}", "bias")] = (out_f,)
    return shapes


def expected_shapes(model: nn.Module, decoder: nn.Module, config, adapter_name: str,
                    to_checkpoint_key: Callable[[str, str], str]) -> dict[str, tuple[int, ...]]:
    """Every tensor a saved adapter of ``config`` holds for ``model``, keyed as in ``adapter_model.safetensors``:
    model keys mapped by the loader's own ``to_checkpoint_key(key, adapter_name)`` (PEFT drops the adapter name
    only where it ends a module path)."""
    shapes = {to_checkpoint_key(f"base_model.beacon_embedding.{adapter_name}", adapter_name):
              (1, decoder.get_input_embeddings().weight.shape[-1])}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        attn = getattr(module, "base_layer", module)
        if anatomy.find(attn) is None:
            continue
        layer_idx = getattr(attn, "layer_idx", None)
        with_projections = config.beacon_layers is None or layer_idx in config.beacon_layers
        for (container, param), shape in projection_shapes(attn, config, with_projections).items():
            key = f"base_model.model.{name}.{container}.{adapter_name}.{param}"
            shapes[to_checkpoint_key(key, adapter_name)] = shape
    return shapes


def _layers(keys: Iterable[str]) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := _LAYER.search(k))})


def _explain(saved: dict, expected: dict, num_layers: int) -> list[str]:
    """What differs between a saved adapter's tensors and the ones this model needs, in words."""
    reasons = []
    extra, missing = sorted(set(saved) - set(expected)), sorted(set(expected) - set(saved))
    saved_layers = _layers(saved)
    if saved_layers and saved_layers[-1] >= num_layers:
        reasons.append(f"it holds beacon weights for decoder layers up to {saved_layers[-1]} (made for a model with "
                       f">= {saved_layers[-1] + 1} layers) but this model has num_hidden_layers={num_layers}")
    if any(k.endswith(".bias") for k in extra):
        reasons.append("it has beacon projection biases (an architecture with attention biases, e.g. Qwen2) but "
                       "this model's projections have none")
    if any(k.endswith(".bias") for k in missing) and not any(k.endswith(".bias") for k in saved):
        reasons.append("this model's projections have biases (e.g. Qwen2) but the adapter has none")
    if any(k.endswith(".A.weight") for k in saved) != any(k.endswith(".A.weight") for k in expected):
        reasons.append("one side uses low-rank beacon projections (beacon_rank) and the other full copies")
    for key in sorted(set(saved) & set(expected)):
        if saved[key] != expected[key]:
            reasons.append(f"{key}: adapter shape {saved[key]} vs model {expected[key]} (another hidden size / "
                           "head_dim / head count)")
    if missing:
        reasons.append(f"{len(missing)} tensor(s) missing from the adapter, e.g. {missing[:3]}")
    if extra:
        reasons.append(f"{len(extra)} tensor(s) the model has no place for, e.g. {extra[:3]}")
    return reasons


def check_adapter_weights(folder: str | Path, model: nn.Module, decoder: nn.Module, config, adapter_name: str,
                          to_checkpoint_key: Callable[[str, str], str]) -> None:
    """Refuse an adapter folder whose weights do not fit ``model`` exactly (before any injection).

    Raises:
        ValueError: corrupt/truncated file, or tensors missing, extra or of another shape (named in the message).
        FileNotFoundError: no weights file in the folder.
    """
    path, saved = saved_shapes(folder)
    expected = expected_shapes(model, decoder, config, adapter_name, to_checkpoint_key)
    if saved == expected:
        return
    reasons = _explain(saved, expected, decoder.config.num_hidden_layers)
    arch = getattr(decoder.config, "model_type", type(decoder).__name__)
    raise ValueError(
        f"adapter {str(path)!r} does not fit this model (model_type={arch!r}, num_hidden_layers="
        f"{decoder.config.num_hidden_layers}, hidden_size={decoder.config.hidden_size}): " + "; ".join(reasons)
    )


def _out_width(saved: dict, proj: str) -> tuple[int, int] | None:
    """(out_features, in_features) of the first saved beacon ``proj`` projection (full copy or low-rank delta)."""
    full = next((shape for key, shape in saved.items() if key.endswith(f".beacon_{proj}.weight")), None)
    if full is not None:
        return full[0], full[1]
    a = next((shape for key, shape in saved.items() if key.endswith(f".beacon_{proj}.A.weight")), None)
    b = next((shape for key, shape in saved.items() if key.endswith(f".beacon_{proj}.B.weight")), None)
    return (b[0], a[1]) if a is not None and b is not None else None


def field_mismatches(saved: dict[str, tuple[int, ...]], base_config, config) -> list[str]:
    """The base config fields the adapter's tensor shapes (``saved``) contradict, in words: ``hidden_size``,
    ``num_hidden_layers`` (an adapter with projections in every layer), ``num_attention_heads x head_dim`` (beacon
    q) and ``num_key_value_heads x head_dim`` (beacon k/v)."""
    hidden, layers = base_config.hidden_size, base_config.num_hidden_layers
    heads = base_config.num_attention_heads
    kv_heads, head_dim = metrics.kv_heads(base_config), metrics.head_dim(base_config)
    reasons = []
    embedding = next((shape for key, shape in saved.items() if "beacon_embedding" in key), None)
    width = embedding[-1] if embedding else next((w[1] for p in PROJECTIONS if (w := _out_width(saved, p))), None)
    if width is not None and width != hidden:
        reasons.append(f"hidden_size: adapter {width} vs model {hidden}")
    saved_layers = _layers(saved)
    if config.beacon_layers is None and saved_layers and saved_layers[-1] + 1 != layers:
        reasons.append(f"num_hidden_layers: adapter {saved_layers[-1] + 1} (beacon projections in every layer) vs "
                       f"model {layers}")
    elif saved_layers and saved_layers[-1] >= layers:
        reasons.append(f"num_hidden_layers: adapter has beacon projections up to layer {saved_layers[-1]} vs model "
                       f"{layers}")
    for projs, field, n in ((("q",), "num_attention_heads", heads), (("k", "v"), "num_key_value_heads", kv_heads)):
        widths = {w[0] for p in projs if (w := _out_width(saved, p))}
        for w in sorted(widths - {n * head_dim}):
            reasons.append(f"{field} x head_dim: adapter {w} (beacon {'/'.join(projs)} projection rows) vs model "
                           f"{n} x {head_dim} = {n * head_dim}")
    return reasons


def check_config_fits(folder: str | Path, base_config, config, adapter_name: str,
                      to_checkpoint_key: Callable[[str, str], str]) -> None:
    """Refuse an adapter folder whose weights do not fit a model of ``base_config`` (a transformers config), without
    the model's weights: `field_mismatches` first, then every tensor against the model built on the meta device.

    Raises:
        ValueError: the fields (or else the tensors) that differ, named; a corrupt/truncated weights file.
        FileNotFoundError: no weights file in the folder.
    """
    from transformers import AutoModelForCausalLM

    path, saved = saved_shapes(folder)
    arch = getattr(base_config, "model_type", None)
    where = (f"adapter {str(path)!r} does not fit the model (model_type={arch!r}, num_hidden_layers="
             f"{base_config.num_hidden_layers}, hidden_size={base_config.hidden_size}): ")
    reasons = field_mismatches(saved, base_config, config)
    if reasons:
        raise ValueError(where + "; ".join(reasons))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(base_config)
    decoder = model.get_decoder()
    expected = expected_shapes(model, decoder, config, adapter_name, to_checkpoint_key)
    if saved != expected:
        raise ValueError(where + "; ".join(_explain(saved, expected, base_config.num_hidden_layers)))
