"""What a beacon memory is worth, measured: one definition of each measure the library, the recipes and the benchmarks
report.

Activation Beacon (arXiv 2401.03462) condenses each completed window of raw activations into a few beacons; the
paper measures the result by language-modelling perplexity on long texts and by needle-in-a-haystack accuracy. The
benchmarks (``benchmarks/``) and the read-back stage (``recipes/train_readback.py``) report those and two finer
probes of what the memory holds, in nats per token, near 0 when it holds nothing:

* **tail NLL** (`tail_nll`): the summed next-token NLL of a sequence's last ``tail`` tokens given everything before
  them; the language-modelling benchmark's perplexity is ``exp(sum / count)`` of it, and both probes below are
  differences of two tail NLLs.
* **key information** (`key_information`): the NLL of a pass key's tokens after a context whose needle holds another
  key, minus after the same context holding this key: what the context tells about the key (full attention: about
  2.3 nats per digit token, the cost of a random digit).
* **context gain** (`context_gain`): the NLL of a stretch's tail after only the token before it, minus after the
  whole stretch: what the earlier (compressed) context is worth to the prediction.
* **held-out loss** (`sequence_losses`): the mean next-token loss over every prediction of a held-out sequence and
  over those after the first window (the only ones that read compressed memory).
* **answers** (`score_answer`, `digit_similarity`): whether a greedy answer holds the expected value, and the
  partial credit of a numeric key.
* **KV size** (`kv_bytes_per_entry`, with `head_dim` and `kv_heads`, a config's fallbacks): the bytes one token's
  keys and values take over all layers, what full attention holds per token and a memory per entry.

The kvpress worker (``benchmarks/common/kvpress_worker.py``) runs in a venv without beacon_peft and mirrors the tail
NLL there (the same targets, scored after a compressed prefill).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F


def head_dim(config) -> int:
    """A transformers config's attention head size: ``head_dim`` where set (Qwen3, Gemma), else
    ``hidden_size // num_attention_heads`` (Llama, SmolLM2)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    """A transformers config's key/value heads: ``num_key_value_heads`` where set (grouped-query attention), else
    ``num_attention_heads``."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def kv_bytes_per_entry(config, dtype: torch.dtype) -> int:
    """Bytes one KV entry (one token's K and V) takes over all layers in ``dtype``:
    ``2 * layers * kv_heads * head_dim * itemsize``. Full attention holds one entry per token, a beacon memory one
    per sink token, beacon and open-window token."""
    return 2 * config.num_hidden_layers * kv_heads(config) * head_dim(config) * dtype.itemsize


def _ids(ids: list[int], device) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, N)


def tail_logits(model, ids: list[int], tail: int, device="cpu") -> torch.Tensor:
    """The float32 logits that predict the last ``tail`` tokens of ``ids``, shape (tail, V): row ``i`` predicts
    token ``N - tail + i`` from the tokens before it.

    One forward over the whole sequence with ``logits_to_keep=tail + 1``. For a beacon adapter this equals
    prefilling the context and feeding the tail through the memory (windows are counted from the sequence start
    either way). ``model``: a causal LM (full attention or a beacon adapter alike)."""
    if not 0 < tail < len(ids):
        raise ValueError(f"tail={tail} must be in [1, {len(ids) - 1}] for {len(ids)} tokens")
    with torch.inference_mode():
        return model(input_ids=_ids(ids, device), logits_to_keep=tail + 1).logits[0, :tail].float()  # (tail, V)


def _nll_sum(logits: torch.Tensor, targets: list[int]) -> float:
    """Summed NLL (nats) of ``targets`` (T,) under ``logits`` (T, V)."""
    with torch.inference_mode():
        return float(F.cross_entropy(logits, _ids(targets, logits.device)[0], reduction="sum"))


def tail_nll(model, ids: list[int], tail: int, device="cpu") -> tuple[float, int]:
    """``(sum_nll, count)`` of the last ``tail`` tokens of ``ids`` given the tokens before them (nats); the first
    tail token is predicted from the context's last position (`tail_logits`)."""
    return _nll_sum(tail_logits(model, ids, tail, device), ids[-tail:]), tail


class KeyInformation(NamedTuple):
    """`key_information`'s result; the NLLs in nats per key token."""

    information: float  # other_nll - own_nll
    own_nll: float  # the key's tokens after the context whose needle holds this key
    other_nll: float  # the key's tokens after the same context holding another key
    own_logits: torch.Tensor  # (K, V) float32: the predictions of the key's K tokens after its own context


def key_information(model, own_ids: list[int], other_ids: list[int], key_ids: list[int],
                    device="cpu") -> KeyInformation:
    """NLL(key | other context) - NLL(key | own context), nats per key token: what a context tells about a pass key.

    ``own_ids`` and ``other_ids`` are a like-for-like pair of prompts (context then question; the same filler,
    depth and phrasing, a different key in the needle: ``beacon_peft.needles.passkey_pair``), ``key_ids`` the
    answer's tokens scored after each. Near 0 when the memory kept nothing of the needle; about 2.3 per digit token
    under full attention."""
    own_logits = tail_logits(model, own_ids + key_ids, len(key_ids), device)
    own = _nll_sum(own_logits, key_ids) / len(key_ids)
    other = tail_nll(model, other_ids + key_ids, len(key_ids), device)[0] / len(key_ids)
    return KeyInformation(other - own, own, other, own_logits)


class ContextGain(NamedTuple):
    """`context_gain`'s result; the NLLs in nats per tail token."""

    gain: float  # alone_nll - with_context_nll
    with_context_nll: float  # the tail after the whole stretch
    alone_nll: float  # the tail after only the token before it


def context_gain(model, ids: list[int], tail: int, device="cpu") -> ContextGain:
    """NLL(tail | only the token before it) - NLL(tail | the whole stretch ``ids``), nats per token: what the earlier
    context (compressed, past the first window) is worth to predicting the last ``tail`` tokens."""
    with_context = tail_nll(model, ids, tail, device)[0] / tail
    alone = tail_nll(model, ids[-tail - 1 :], tail, device)[0] / tail
    return ContextGain(alone - with_context, with_context, alone)


def sequence_losses(model, ids: torch.Tensor, window: int) -> tuple[float, float, int, int]:
    """Held-out loss of one (1, L) sequence: ``(sum of the next-token losses over all L - 1 predictions, sum over
    those after the first window, their counts)``, nats. The predictions after the first ``window`` tokens are the
    only ones whose context holds a completed (compressed) window."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # (L - 1, V)
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")  # (L - 1,) prediction of token t+1 from tokens <= t
    after = nll[window:]  # predictions of tokens window+1 .. L-1: their context includes a completed window
    return nll.sum().item(), after.sum().item(), nll.numel(), after.numel()


def score_answer(generated_text: str, answer: str) -> bool:
    """True when ``answer`` appears in the generated text as a whole token: an all-digit answer must not be part of a
    longer digit run ("68213" is not found in "682130"), a word answer matches regardless of case but not inside a
    longer word ("lighthouse" is found in "Lighthouse." but not in "lighthousekeeper")."""
    answer = str(answer).strip()
    if answer.isdigit():
        return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", generated_text) is not None
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", generated_text, flags=re.IGNORECASE) is not None


def digit_similarity(generated_text: str, answer: str) -> float:
    """Partial credit for a numeric key: ``1 - edit_distance(first digit run, answer) / len(answer)``, floored at 0
    (1.0: the key exactly; "9376" for "93765": 0.8; no digits: 0.0). It shows a memory that carries most of a key
    before greedy answers are exactly right.

    Raises:
        ValueError: ``answer`` is not all digits.
    """
    answer = str(answer).strip()
    if not answer.isdigit():
        raise ValueError(f"answer={answer!r}: digit_similarity scores an all-digit key")
    found = re.search(r"\d+", generated_text)
    got = found.group(0) if found else ""
    prev = list(range(len(got) + 1))  # Levenshtein distance, one row at a time
    for i, a in enumerate(answer, 1):
        row = [i]
        for j, b in enumerate(got, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = row
    return max(0.0, 1.0 - prev[-1] / len(answer))
