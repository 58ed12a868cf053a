"""Measurements on a causal LM in this process (full attention or a beacon adapter alike).

Every function takes a model that behaves like a transformers causal LM (``model(input_ids=...,
logits_to_keep=k, cache=...)``, ``past_key_values=`` before transformers 5.24) and plain token-id lists, and
mirrors the definition the kvpress worker uses for the same measurement, so numbers from both sides are comparable:

- ``greedy``: greedy continuation of a prompt (``model.generate``, stopping at EOS).
- ``prefill_decode``: prefill time, KV bytes held after it, greedy decode time per token, peak RSS.

The scores themselves (tail NLL, key information, context gain, answer scores, KV bytes per entry) are the
library's, `beacon_peft.metrics`.

KV accounting: ``cache_tensors`` yields the K/V tensors a cache really holds (a ``BeaconMemory`` or an HF
``DynamicCache``); ``beacon_entries`` gives how many entries a beacon memory should hold (times
`beacon_peft.metrics.kv_bytes_per_entry`: its bytes).
"""

from __future__ import annotations

import ctypes
import gc
import time

import torch

from beacon_peft.compat import output_cache
from beacon_peft.reuse import cache_kwargs

from . import metrics


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings are real (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so the next phase's RSS
    high-water mark starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ids(ids: list[int], device) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)


def greedy(model, prompt: list[int], max_new_tokens: int, pad_token_id: int, device="cpu") -> list[int]:
    """Greedy continuation of ``prompt`` (new token ids only; generation stops at the model's EOS)."""
    ids = _ids(prompt, device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_token_id)
    return out[0, len(prompt):].tolist()


def cache_tensors(cache):
    """The K/V tensors a cache holds: every part of every layer of a ``BeaconMemory``, or ``keys``/``values``
    of every layer of an HF cache."""
    if hasattr(cache, "kv_tensors"):  # BeaconMemory
        yield from cache.kv_tensors()
        return
    for layer in cache.layers:
        yield getattr(layer, "keys", None)
        yield getattr(layer, "values", None)


def cache_entries(cache) -> int:
    """KV entries (tokens) held per layer for row 0: what the next token attends to."""
    if hasattr(cache, "num_entries"):
        return int(cache.num_entries()[0])
    return int(max(layer.keys.shape[-2] for layer in cache.layers))


def beacon_entries(n_tokens: int, window: int, ratio: int, sink: int = 0) -> int:
    """Entries a beacon memory holds after ``n_tokens`` (interleave placement, stride = window, sink reached):
    ``sink`` + ``window / ratio`` beacons per completed window + the open window's raw tokens and the beacons
    interleaved among them."""
    done, open_raw = divmod(n_tokens, window)
    return sink + done * (window // ratio) + open_raw + open_raw // ratio


def beacon_bound_entries(n_tokens: int, window: int, ratio: int, sink: int = 0) -> float:
    """The usual upper estimate ``sink + N / r + window`` of a beacon memory's entries."""
    return sink + n_tokens / ratio + window


def prefill_decode(model, ids: list[int], n_decode: int, device="cpu") -> dict:
    """Prefill ``ids`` (logits of the last token only), then ``n_decode`` greedy steps through the cache.

    Returns ``prefill_s``, ``decode_s_per_token``, ``kv_bytes`` and ``kv_entries`` (held after the prefill,
    measured from the tensors), ``rss_before_bytes`` and ``peak_rss_bytes`` (high-water mark since just before
    the prefill on Linux, else the process peak), and ``peak_gpu_bytes`` on CUDA.
    """
    release_memory()
    rss0 = metrics.current_rss_bytes()
    reset = metrics.reset_peak_rss()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        x = _ids(ids, device)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=x, logits_to_keep=1)
        sync(device)
        prefill_s = time.perf_counter() - t0
        cache = output_cache(out)
        res = dict(prefill_s=prefill_s, kv_bytes=metrics.kv_bytes(cache_tensors(cache)),
                   kv_entries=cache_entries(cache))
        token = out.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(input_ids=token, **cache_kwargs(model, cache), logits_to_keep=1)  # cache= from 5.24
            token = out.logits[0, -1].argmax().view(1, 1)
        sync(device)
        decode_s = time.perf_counter() - t0
    res.update(decode_s_per_token=decode_s / n_decode if n_decode else None, rss_before_bytes=rss0,
               peak_rss_bytes=metrics.peak_rss_since_reset_bytes() if reset else metrics.peak_rss_bytes())
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del out, cache
    return res
