"""Passkey / needle-in-a-haystack prompts built at the token level.

Pure Python; the tokenizer is passed in and only ``encode(text, add_special_tokens=False)``
and ``decode(ids)`` are used, so this works with any HF tokenizer or a hand-made one in tests.
The texts (pass-key needle, question, intro, names) and `needle_compressed` are the library's
(`beacon_peft.facts`), so the benchmarks ask what the training data and the demo ask.

Layout of a case (all token ids, ``len(context_ids) == context_tokens`` exactly)::

    context_ids  = intro + filler[:p1] + needle_1 + filler[p1:p2] + needle_2 + ... + filler[pk:]
    question_ids = "\\nWhat is the pass key? The pass key is"

The filler is the haystack (cycled when too short) starting at ``filler_offset``. A needle's
insertion point is ``round(depth * n_filler)`` snapped to the nearest sentence/newline boundary
within ``snap_window`` filler tokens (a boundary lies right after a token whose decoded text
ends with ``. ! ? \\n``; the filler's start and end are boundaries too). Everything is
deterministic given ``seed``: key digits come from ``random.Random(seed)``.
"""

from __future__ import annotations

import random

from . import facts
from .facts import (
    QUIZ_INTRO,
    SENTENCE_ENDS,
    check_phrasing,
    named_pass_key_fact,
    needle_compressed,  # noqa: F401
    pass_key_fact,
    random_number,
)

# The texts of a case are `beacon_peft.facts`' (the library's one copy), here under the names the runners use;
# `needle_compressed` is re-exported for them too.
INTRO = QUIZ_INTRO
PASSKEY_NEEDLE = pass_key_fact("{key}").inserted  # " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = pass_key_fact("{key}").asked  # "\n\nWhat is the pass key? The pass key is"
MULTIKEY_NEEDLE = named_pass_key_fact("{name}", "{key}").inserted
MULTIKEY_QUESTION = named_pass_key_fact("{name}", "{key}").asked
NAMES = facts.NAMES[:16]  # the multi-key cases draw their names from these 16 (as when their results were recorded)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _filler(haystack_ids: list[int], n: int, offset: int) -> list[int]:
    if n <= 0:
        return []
    if not haystack_ids:
        raise ValueError("haystack_ids is empty")
    h = len(haystack_ids)
    return [haystack_ids[(offset + i) % h] for i in range(n)]


def snap_to_boundary(filler_ids: list[int], tokenizer, pos: int, window: int) -> int:
    """Nearest boundary index to ``pos`` within ``window`` tokens (ties: the earlier one);
    ``pos`` itself when none is that near. Index ``i`` is a boundary when ``i`` is 0 or
    ``len(filler_ids)``, or ``decode([filler_ids[i-1]])`` ends with ``. ! ? \\n``."""
    n = len(filler_ids)
    pos = min(max(pos, 0), n)
    best = None
    for i in range(max(0, pos - window), min(n, pos + window) + 1):
        if i in (0, n) or tokenizer.decode([filler_ids[i - 1]]).rstrip(" ").endswith(SENTENCE_ENDS):
            if best is None or abs(i - pos) < abs(best - pos):
                best = i
    return pos if best is None else best


def _assemble(haystack_ids, tokenizer, context_tokens, needles, intro, filler_offset, snap_window):
    """``needles``: list of (depth, needle_ids). Returns (context_ids, starts, depths_actual)
    with starts/depths in the order of ``needles``."""
    intro_ids = _encode(tokenizer, intro) if intro else []
    n_fill = context_tokens - len(intro_ids) - sum(len(ids) for _, ids in needles)
    if n_fill < 0:
        raise ValueError(
            f"context_tokens={context_tokens} is too small for the intro and needles "
            f"({context_tokens - n_fill} tokens)"
        )
    filler = _filler(list(haystack_ids), n_fill, filler_offset)
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
    points = [snap_to_boundary(filler, tokenizer, round(d * n_fill), snap_window) for d, _ in needles]
    order = sorted(range(len(needles)), key=lambda k: (points[k], k))
    context = list(intro_ids)
    starts = [0] * len(needles)
    prev = 0
    for k in order:
        context += filler[prev : points[k]]
        starts[k] = len(context)
        context += needles[k][1]
        prev = points[k]
    context += filler[prev:]
    assert len(context) == context_tokens
    depths = [p / n_fill if n_fill else 0.0 for p in points]
    return context, starts, depths


def make_passkey_case(
    haystack_ids: list[int],
    tokenizer,
    context_tokens: int,
    depth: float,
    seed: int,
    *,
    key_digits: int = 5,
    intro: str = INTRO,
    filler_offset: int = 0,
    snap_window: int = 32,
    needle: str = PASSKEY_NEEDLE,
    question: str = PASSKEY_QUESTION,
) -> dict:
    """One passkey case. Returns a dict with

    - ``context_ids`` (exactly ``context_tokens`` ids), ``question_ids``, ``answer`` (the key),
    - ``needle_token_start`` / ``needle_token_end``: the needle's span in ``context_ids``,
    - ``depth_actual``: insertion point / number of filler tokens after snapping, ``seed``.

    ``needle`` (a template holding ``{key}``) and ``question`` phrase the case differently from the defaults, e.g.
    to check that a trained reader generalises beyond the phrasing it was trained on (``check_phrasing``).
    """
    check_phrasing(needle, question)
    rng = random.Random(seed)
    key = random_number(rng, key_digits)
    needle_ids = _encode(tokenizer, needle.format(key=key))
    context, starts, depths = _assemble(
        haystack_ids, tokenizer, context_tokens, [(depth, needle_ids)], intro, filler_offset, snap_window
    )
    return dict(
        context_ids=context,
        question_ids=_encode(tokenizer, question),
        answer=key,
        needle_token_start=starts[0],
        needle_token_end=starts[0] + len(needle_ids),
        depth_actual=depths[0],
        seed=seed,
    )


def make_fact_case(
    haystack_ids: list[int],
    tokenizer,
    context_tokens: int,
    depth: float,
    fact: facts.Fact,
    *,
    intro: str = INTRO,
    filler_offset: int = 0,
    snap_window: int = 32,
) -> dict:
    """One case of any `beacon_peft.facts.Fact` (e.g. `beacon_peft.eval_facts.eval_fact`): its `Fact.inserted`
    needle at ``depth``, its `Fact.asked` question; the fields of `make_passkey_case` with ``answer`` the fact's
    value and ``fact`` the fact."""
    needle_ids = _encode(tokenizer, fact.inserted)
    context, starts, depths = _assemble(
        haystack_ids, tokenizer, context_tokens, [(depth, needle_ids)], intro, filler_offset, snap_window
    )
    return dict(
        context_ids=context,
        question_ids=_encode(tokenizer, fact.asked),
        answer=fact.value,
        needle_token_start=starts[0],
        needle_token_end=starts[0] + len(needle_ids),
        depth_actual=depths[0],
        fact=fact,
    )


def make_multikey_case(
    haystack_ids: list[int],
    tokenizer,
    context_tokens: int,
    seed: int,
    *,
    n_keys: int = 4,
    depths: list[float] | None = None,
    query_index: int | None = None,
    key_digits: int = 5,
    intro: str = INTRO,
    filler_offset: int = 0,
    snap_window: int = 32,
) -> dict:
    """Several needles "The pass key for <name> is <key>..." with distinct names and keys, and
    a question about one of them (``query_index``, else drawn from the seed).

    ``depths`` defaults to evenly spread ``(i + 0.5) / n_keys``. Returns the passkey fields
    (``needle_token_start``/``_end`` and ``depth_actual`` refer to the queried needle) plus
    ``names``, ``keys``, ``query_index``, ``needle_token_starts``, ``depths_actual``.
    """
    if not 1 <= n_keys <= len(NAMES):
        raise ValueError(f"n_keys must be in [1, {len(NAMES)}]")
    rng = random.Random(seed)
    names = rng.sample(NAMES, n_keys)
    keys: list[str] = []
    while len(keys) < n_keys:
        k = random_number(rng, key_digits)
        if k not in keys:
            keys.append(k)
    if query_index is None:
        query_index = rng.randrange(n_keys)
    if depths is None:
        depths = [(i + 0.5) / n_keys for i in range(n_keys)]
    if len(depths) != n_keys:
        raise ValueError("len(depths) must equal n_keys")
    needle_ids = [_encode(tokenizer, named_pass_key_fact(n, k).inserted) for n, k in zip(names, keys)]
    context, starts, actual = _assemble(
        haystack_ids, tokenizer, context_tokens, list(zip(depths, needle_ids)), intro, filler_offset, snap_window
    )
    q = query_index
    return dict(
        context_ids=context,
        question_ids=_encode(tokenizer, named_pass_key_fact(names[q], keys[q]).asked),
        answer=keys[q],
        needle_token_start=starts[q],
        needle_token_end=starts[q] + len(needle_ids[q]),
        depth_actual=actual[q],
        seed=seed,
        names=names,
        keys=keys,
        query_index=q,
        needle_token_starts=starts,
        depths_actual=actual,
    )


def passkey_pair(haystack_ids: list[int], tokenizer, context_tokens: int, depth: float, seed: int, other_seed: int,
                 **phrasing) -> tuple[dict, dict] | None:
    """Two `make_passkey_case` cases alike but for the key (``seed`` and ``other_seed`` draw the keys; the same
    filler, depth and ``phrasing`` keywords): the *own* case and the *other* one whose context holds another key.
    The key information of a reader is NLL(own key | other context) - NLL(own key | own context).

    Returns None when the two keys are equal or tokenize to different lengths (the filler and the needle would sit
    at other positions: not a like-for-like pair)."""
    own = make_passkey_case(haystack_ids, tokenizer, context_tokens, depth, seed, **phrasing)
    other = make_passkey_case(haystack_ids, tokenizer, context_tokens, depth, other_seed, **phrasing)
    if other["answer"] == own["answer"] or other["needle_token_start"] != own["needle_token_start"]:
        return None
    return own, other


