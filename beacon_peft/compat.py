"""Everything beacon_peft needs from transformers that moves between releases, in one place.

* The cache keyword: up to 5.23 the causal LM hands its decoder ``past_key_values=``; from 5.24 it hands it
  ``cache=`` (``past_key_values`` is deprecated, to be removed in 5.40), and model outputs carry the cache in a
  ``cache`` field. `take_cache` finds the memory under whichever name it arrives, `cache_kwarg` is the name the
  installed decoder expects, `model_output` builds a decoder output with the installed field name.
* The supported range: `check_versions` warns once, naming the versions, when the installed transformers lies
  outside the range the test suite has passed on (``pyproject.toml`` declares the same bounds).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import torch
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast

# Bounds the suite has passed on (kept equal to pyproject.toml's `transformers>=...,<...`; a test checks it).
TRANSFORMERS_MIN = "5.23.0"
TRANSFORMERS_BELOW = "5.26"

CACHE_NAMES = ("cache", "past_key_values", "cache_params")  # every name a decoder's cache may arrive under
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
OUTPUT_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Pop the cache from ``kwargs`` whatever its name (``cache``, ``past_key_values``, ``cache_params``).

    Raises:
        ValueError: two names carry two different objects (which one is meant cannot be known).
    """
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if name in kwargs}
    values = [v for v in given.values() if v is not None]
    if any(v is not values[0] for v in values[1:]):
        raise ValueError(f"the cache was passed twice with different objects under {sorted(given)}: pass one")
    return values[0] if values else None


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` (a decoder of the installed transformers) takes its cache."""
    params = inspect.signature(type(module).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_output(last_hidden_state: torch.Tensor, cache: Any, hidden_states: tuple | None = None,
                 moe: bool = False) -> BaseModelOutputWithPast:
    """A decoder output holding ``cache`` in the field the installed transformers reads (``cache`` or
    ``past_key_values``), so the causal LM and ``generate`` carry the memory on, and ``hidden_states`` (the
    embeddings' and every layer's output, as the base decoder gives them) when asked. ``moe``: a mixture-of-experts
    decoder's output type, whose causal LM reads ``router_logits`` (None: no load-balancing term is asked)."""
    if moe:
        return MoeModelOutputWithPast(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                                      router_logits=None, **{OUTPUT_CACHE_FIELD: cache})
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                                   **{OUTPUT_CACHE_FIELD: cache})


def output_cache(output: Any) -> Any:
    """The cache of a model output, under whichever field the installed transformers uses (no deprecation
    warning): ``out.cache`` on 5.24+, ``out.past_key_values`` before."""
    keys = output.keys()
    for name in (OUTPUT_CACHE_FIELD, "cache", "past_key_values"):
        if name in keys:
            return output[name]
    return None


def version_problem(installed: str, low: str = TRANSFORMERS_MIN, below: str = TRANSFORMERS_BELOW) -> str | None:
    """A sentence naming the versions when ``installed`` lies outside ``[low, below)``, else None."""
    v = Version(installed)
    if Version(low) <= v < Version(below):
        return None
    return (f"beacon_peft was tested with transformers>={low},<{below} but transformers {installed} is installed; "
            "it patches the decoder's forward, so results may differ. Install the locked versions "
            "(scripts/setup.sh, requirements/lock.txt) or run scripts/compat.sh to test this one.")


_warned = False


def check_versions(installed: str | None = None) -> None:
    """Warn once per process when the installed transformers (or ``installed``) lies outside the tested range."""
    global _warned
    if installed is None:
        import transformers

        installed = transformers.__version__
    problem = version_problem(installed)
    if problem and not _warned:
        _warned = True
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
