"""Compress once, ask many: read a long document into a beacon memory once, then answer from forks of it.

In the paper's terms, reading a document of ``N`` tokens runs ``N / window`` forward steps and leaves a memory of
``sink + N / r + window`` entries (sink, the beacons of every completed window, the raw cache of the open window):
reading is the expensive part, answering from the memory costs a few short steps. So:

* `read` runs the document through the model once, window-aligned piece by piece (a progress bar can follow it),
  and returns the memory;
* `ask` answers a question from a *fork* of that memory (`BeaconMemory.copy`: shared K/V tensors, copied
  bookkeeping), so the memory is left as it was and every question sees the document only, never another
  question;
* `beacon_peft.chat.Chat` lets the turns of a conversation flow into the memory instead.

What ``generate()`` does to a memory handed to it: it **consumes** it. ``generate`` carries the cache from step
to step and the beacon loop commits every step into the memory it was given, so afterwards that object holds the
question and every generated token but the last (which was never fed back). Hand it a fork
(``past_key_values=memory.copy()``) to keep the memory, and give it only the new tokens with an ``attention_mask``
covering memory and new tokens (``generate`` then reads the tokens as new; given ``input_ids`` of the question
alone and no mask, it would slice them by the memory's length and feed nothing).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .compat import cache_kwarg, output_cache
from .memory import BeaconMemory
from .schedule import check_continuable_calls
from .support import decoder_of


def cache_kwargs(model, memory: Optional[BeaconMemory]) -> dict:
    """``{name: memory}`` under the keyword the installed transformers' causal LM takes (``cache`` from 5.24,
    ``past_key_values`` before), for ``model(...)`` and ``model.generate(...)``; empty for no memory."""
    if memory is None:
        return {}
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {cache_kwarg(lm): memory}


def as_token_batch(name: str, ids) -> torch.Tensor:
    """``ids`` as a (batch, length >= 1) tensor of token ids (a 1-D tensor becomes one row); ``name`` in messages."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.LongTensor of token ids (batch, length), got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token, shape (batch, length >= 1), got {tuple(ids.shape)}")
    return ids


def _tuner_config(model):
    """The active beacon adapter's config of a PEFT model (TypeError for any other model, ValueError when disabled)."""
    tuner = getattr(model, "base_model", None)
    if not hasattr(tuner, "active_beacon_adapter"):
        raise TypeError(f"model must be a PEFT model with a beacon adapter (get_peft_model(model, BeaconConfig(...)) "
                        f"or PeftModel.from_pretrained), got {type(model).__name__}")
    adapter = tuner.active_beacon_adapter()
    if adapter is None:
        raise ValueError("the beacon adapter is disabled: enable it to read into or answer from a memory")
    return tuner.peft_config[adapter]


@torch.no_grad()
def read(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
         memory: Optional[BeaconMemory] = None, piece_windows: int = 8,
         progress: Optional[Callable[[int], None]] = None) -> BeaconMemory:
    """Read ``input_ids`` (B, N) into a memory (a new one, or ``memory`` continued and returned).

    The input is fed ``piece_windows`` windows (strides) at a time, cut at window boundaries, so the result is
    the memory of one call over the whole input (the window loop cuts there anyway) while ``progress(n)`` is told
    after every piece how many tokens were read. Logits are computed for the last position only.
    ``attention_mask`` (B, N) marks left padding with 0 (rows are read over their own tokens).
    """
    input_ids = as_token_batch("input_ids", input_ids)
    if isinstance(piece_windows, bool) or not isinstance(piece_windows, int) or piece_windows < 1:
        raise ValueError(f"piece_windows={piece_windows!r} must be an int >= 1")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if memory is not None and not isinstance(memory, BeaconMemory):
        raise TypeError(f"memory must be a BeaconMemory or None, got {type(memory).__name__}")
    config = _tuner_config(model)
    check_continuable_calls(config, decoder_of(model.get_base_model()).training, "reuse.read")
    # the first piece ends where the memory's open window ends, so every later piece is window-aligned
    done = 0 if memory is None else (memory.state.rows[0].tokens - config.window) % config.stride
    piece = piece_windows * config.stride
    start, n = 0, input_ids.shape[1]
    first = max(piece - done, _first_window_end(config, memory, attention_mask, input_ids))
    while start < n:
        end = min(n, first if start == 0 else start + piece)
        mask = None if attention_mask is None else attention_mask[:, start:end]
        out = model(input_ids=input_ids[:, start:end], attention_mask=mask, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, memory))
        memory = output_cache(out)
        if progress is not None:
            progress(end - start)
        start = end
    return memory


def _first_window_end(config, memory: Optional[BeaconMemory], attention_mask, input_ids) -> int:
    """Columns the first piece must span so that every row completes its first window inside it.

    With a sink (``sink_size > 0``) and nothing compressed yet, every call sets the sink to its first chunk's first
    entries (the official behaviour, see docs/semantics.md), so a cut inside a row's first window would change
    the memory; with ``sink_size == 0`` any cut gives the memory of one call."""
    if not config.sink_size:
        return 0
    B, n = input_ids.shape
    real = torch.ones(B, n, dtype=torch.long) if attention_mask is None else attention_mask.detach().cpu().long()
    counts = real.cumsum(1)  # (B, n) real tokens read up to each column
    end = 0
    for b in range(B):
        row = memory.state.rows[b] if memory is not None else None
        if row is not None and row.windows > 0:
            continue
        need = config.window - (row.tokens if row is not None else 0)
        reached = (counts[b] >= need).nonzero()
        if not len(reached):
            return n  # this row never completes its first window: one call
        end = max(end, int(reached[0]) + 1)
    return end


def fork(memory: BeaconMemory) -> BeaconMemory:
    """Deprecated (removed in 0.2): a fork is ``memory.copy()`` (`BeaconMemory.copy`), the one name for it."""
    if not isinstance(memory, BeaconMemory):
        raise TypeError(f"memory must be a BeaconMemory, got {type(memory).__name__}")
    warnings.warn("beacon_peft.reuse.fork(memory) is deprecated and will be removed in beacon_peft 0.2: "
                  "use memory.copy()", FutureWarning, stacklevel=2)
    return memory.copy()


def _generate_expansion(model, generate_kwargs: dict) -> int:
    """How many rows generate() makes of each input row: ``max(num_beams, num_return_sequences)``, from the call's
    keywords, else its ``generation_config``, else the model's."""
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    sizes = []
    for name in ("num_beams", "num_return_sequences"):
        value = generate_kwargs.get(name, getattr(config, name, None))
        value = 1 if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: an int >= 1")
        sizes.append(value)
    return max(sizes)


@torch.no_grad()
def ask(model, memory: BeaconMemory, question_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
        return_memory: bool = False, **generate_kwargs):
    """Answer ``question_ids`` (B, Lq) from a fork of ``memory``; returns the new token ids (B, T).

    ``memory`` is not changed (`generate` runs on `BeaconMemory.copy`), so any number of questions can be asked
    from one read document, each seeing the document only. ``attention_mask`` (B, Lq) may mark the question's
    left padding; the memory's own columns are prepended. ``generate_kwargs`` go to ``model.generate``
    (``max_new_tokens``, ``do_sample``, ...). With ``return_memory=True`` returns ``(new_ids, fork)``: the fork
    then holds the question and the answer but its last token (generate never feeds that one back).

    The answer equals that of ``model.generate`` over the whole document followed by the question, beam search and
    several returned sequences included (the fork is expanded to ``max(num_beams, num_return_sequences)`` rows
    per row, as generate() expands the question; the answer then has that many rows per question).
    """
    _tuner_config(model)
    if not isinstance(memory, BeaconMemory):
        raise TypeError(f"memory must be a BeaconMemory from `read` or a forward call, got {type(memory).__name__}")
    question_ids = as_token_batch("question_ids", question_ids)
    if question_ids.shape[0] != memory.batch_size:
        raise ValueError(f"question_ids has {question_ids.shape[0]} rows but the memory holds {memory.batch_size}")
    if attention_mask is None:
        attention_mask = torch.ones_like(question_ids)
    elif attention_mask.shape != question_ids.shape:
        raise ValueError(f"attention_mask must have the shape of question_ids {tuple(question_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    for key in ("input_ids", "past_key_values", "cache", "inputs_embeds"):
        if key in generate_kwargs:
            raise TypeError(f"ask() takes the memory and question itself: do not pass {key}=")
    branch = memory.copy()
    expand = _generate_expansion(model, generate_kwargs)
    if expand > 1:  # generate() repeats input_ids rows for beams / several sequences, but not a cache's rows
        branch.batch_repeat_interleave(expand)
    past = attention_mask.new_ones(question_ids.shape[0], branch.get_seq_length())
    # generate reads input_ids as new tokens when the mask is longer (it covers the memory's columns too)
    out = model.generate(input_ids=question_ids, attention_mask=torch.cat((past, attention_mask), dim=1),
                         use_cache=True, **cache_kwargs(model, branch), **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[:, question_ids.shape[1]:]
    return (new, branch) if return_memory else new
