"""The read-back stage's training curve: fixed held-out probes and what the compressed memory gives back of them
(key information, keys read back exactly, context gain), measured every ``--eval_every`` steps (`probe_point`)."""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch


def held_out_haystack(tokenizer) -> list[int]:
    """The held-out essays' token stream both probes draw from (tokenized once per run)."""
    from beacon_peft.offline.corpora import haystack_ids

    return haystack_ids(tokenizer, 40000, "held_out")


def make_probe(tokenizer, hay: list[int], n: int, window: int, seed: int = 1234, unseen: bool = False) -> list[dict]:
    """Fixed held-out key pairs (own key, other key, same filler) whose needle ends inside a compressed window.

    ``unseen``: each pair states and asks its key in a phrasing composed from the held-out split of
    `beacon_peft.training.phrasings` (no holder, attribute, statement or question pattern any row trains on)
    instead of the pass-key sentence."""
    from beacon_peft.facts import as_passkey_template, needle_compressed
    from beacon_peft.needles import passkey_pair
    from beacon_peft.training.phrasings import compose_fact

    cases, c = [], 0
    while len(cases) < n and c < 20 * n:
        length = (1024, 2048, 4096)[c % 3]
        depth = 0.05 + 0.5 * random.Random(seed + c).random()
        offset = random.Random(seed * 7 + c).randrange(len(hay))
        phrasing = dict(filler_offset=offset)  # the pass-key sentence, question and intro unless unseen
        if unseen:
            needle, question = as_passkey_template(compose_fact(random.Random(seed * 13 + c), "held_out"))
            phrasing.update(needle=needle, question=question, intro="")
        pair = passkey_pair(hay, tokenizer, length, depth, seed + c, seed + c + 7919, **phrasing)
        c += 1
        if pair is None:
            continue
        own, other = pair
        if not needle_compressed(own, length + len(own["question_ids"]), window, window):
            continue  # the needle must lie in a completed (compressed) window (stride = window here)
        answer = tokenizer.encode(" " + own["answer"], add_special_tokens=False)
        cases.append(dict(own=own["context_ids"] + own["question_ids"],
                          other=other["context_ids"] + other["question_ids"], answer=answer, length=length))
    return cases


@contextmanager
def _measuring(model, ratio: int):
    """Eval mode at compression ``ratio`` for a probe, then training mode and the earlier ratio setting again (also
    when the probe raises)."""
    model.eval()
    try:
        with model.base_model.compression_ratio(ratio):
            yield
    finally:
        model.train()


@torch.no_grad()
def key_readback(model, probe: list[dict], device, ratio: int = 8) -> dict[str, float]:
    """What the memory gives back of each probe key, at compression ``ratio``:

    - ``information``: mean NLL(key | other context) - NLL(key | own context), nats per key token
      (`beacon_peft.metrics.key_information`);
    - ``token_accuracy``: share of key tokens that are the argmax after their own context and the key's earlier
      tokens (teacher forcing);
    - ``exact``: share of keys whose every token is that argmax, i.e. the keys greedy decoding writes exactly.
    """
    from beacon_peft.metrics import key_information as information_of

    gaps, hits, exact, n_tokens = [], 0, 0, 0
    with _measuring(model, ratio):
        for case in probe:
            key = information_of(model, case["own"], case["other"], case["answer"], device)
            target = torch.tensor(case["answer"], device=key.own_logits.device)
            right = key.own_logits.argmax(-1) == target  # (answer tokens,)
            hits, exact, n_tokens = hits + int(right.sum()), exact + int(right.all()), n_tokens + len(right)
            gaps.append(key.information)
    return dict(information=sum(gaps) / max(1, len(gaps)), token_accuracy=hits / max(1, n_tokens),
                exact=exact / max(1, len(probe)))


def key_information(model, probe: list[dict], device, ratio: int = 8) -> float:
    """Mean over the probe of NLL(key | other context) - NLL(key | own context), nats per key token."""
    return key_readback(model, probe, device, ratio)["information"]


def make_text_probe(hay: list[int], n: int, length: int = 2048, seed: int = 4321) -> list[list[int]]:
    """Fixed held-out stretches of ``length`` tokens for the context gain (the memory probe's definition)."""
    starts = [random.Random(seed + c).randrange(len(hay)) for c in range(n)]
    return [[hay[(s + i) % len(hay)] for i in range(length)] for s in starts]


@torch.no_grad()
def context_gain(model, stretches: list[list[int]], device, ratio: int = 8, tail: int = 64) -> float:
    """Mean over the stretches of NLL(tail | only the token before it) - NLL(tail | the whole stretch), nats per
    token: what the compressed earlier windows are worth to the prediction (`beacon_peft.metrics.context_gain`)."""
    from beacon_peft.metrics import context_gain as gain_of

    with _measuring(model, ratio):
        gains = [gain_of(model, ids, tail, device).gain for ids in stretches]
    return sum(gains) / max(1, len(gains))


def probe_point(model, probe: list[dict], texts: list[list[int]], device, step: int, tokens: int,
                unseen: list[dict] | None = None, ratio: int = 8) -> dict:
    """One point of the training curve at compression ``ratio`` (recorded in the point), held-out texts: key
    information, the share of key tokens and of whole keys read back exactly (`key_readback`), context gain;
    with ``unseen``, also the key information of held-out composed phrasings (``key_information_unseen``)."""
    keys = key_readback(model, probe, device, ratio)
    point = dict(step=step, tokens=tokens, ratio=ratio, key_information=keys["information"],
                 key_token_accuracy=keys["token_accuracy"], key_exact=keys["exact"],
                 context_gain=context_gain(model, texts, device, ratio))
    if unseen:
        point["key_information_unseen"] = key_information(model, unseen, device, ratio)
    extra = f", unseen phrasings {point['key_information_unseen']:.3f}" if unseen else ""
    print(f"step {step}: key information {point['key_information']:.3f} (tokens right "
          f"{point['key_token_accuracy']:.0%}, keys exact {point['key_exact']:.0%}), context gain "
          f"{point['context_gain']:.3f}" + extra, flush=True)
    return point
