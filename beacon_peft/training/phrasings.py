"""Composed needle phrasings: many ways to state a fact and to ask for it, with a held-out split.

`synthetic.TEMPLATES` holds ten fixed sentences; an adapter trained on them keeps a key stated that way far better
than one stated any other way (the memory probe measured 55% / 29% of the key information at 1K / 2K for a phrasing
unlike any in the project). Here a fact is *composed* from independent parts, so the beacons learn to keep "a
number someone stated" rather than a sentence:

* a **holder** (``Ingrid``, ``the night porter``, ``Dr. Osei``, ...) and its possessive;
* an **attribute** (``door code``, ``locker combination``, ``membership number``, ...);
* a **statement** pattern (``{Hs} {a} is {v}.``, ``{H} changed the {a} to {v} last week.``, ``According to {h},
  the {a} is {v}.``, ...), the value anywhere in the sentence;
* a **question** pattern and its answer lead-in (``What is {hs} {a}?`` / ``{Hs} {a} is``, ``Which number did {h}
  give for the {a}?`` / ``The number was``, ...), worded unlike the statement;
* a **value**: a 3-8 digit number mostly, sometimes a letter-digit code.

Every part list is split in two by `split`: ``"train"`` draws only from the first part, ``"held_out"`` only from
the second, so a held-out fact shares no holder, attribute, statement or question pattern with anything trained on
and scores how the memory generalises. The split is fixed by the lists themselves (every fourth item is held out).

A composed fact is a `beacon_peft.facts.Fact` (re-exported here as `Fact`), the type every needle of the project is.
"""

from __future__ import annotations

import random
from typing import Sequence

from .. import eval_facts
from ..eval_facts import check_training_fact
from ..facts import CODE_LETTERS, NAMED_PASS_KEY, PASS_KEY, Fact, as_passkey_template, random_number

__all__ = ["HOLDERS", "ATTRIBUTES", "STATEMENTS", "QUESTIONS", "SPLITS", "Fact", "split_items", "draw_value",
           "compose_fact", "compose_facts", "as_passkey_template", "training_phrasings"]

HOLDERS: tuple[str, ...] = (
    "Ingrid", "Tomasz", "Aiko", "Mr. Okafor", "the night porter", "Beatriz", "Dr. Osei", "my landlord", "Farida",
    "Lukas", "the caretaker", "Sione", "Ms. Lindqvist", "Rafael", "the librarian", "Kemal", "Priya", "Old Martin",
    "the receptionist", "Gwen", "Hamid", "Captain Reyes", "the head chef", "Noor", "Yusuf", "Professor Hale",
    "the courier", "Eliska", "Bram", "Nadia", "the gardener", "Chidi",
)
ATTRIBUTES: tuple[str, ...] = (
    "door code", "locker combination", "membership number", "phone extension", "ticket number", "safe combination",
    "badge number", "house number", "alarm code", "order number", "gate code", "seat number", "account number",
    "parcel number", "favourite number", "PIN", "booking reference", "employee number", "cabin number",
    "customer number", "serial number", "registration number", "staff code", "invoice number",
)
# {H} holder (capitalised), {h} holder, {Hs} / {hs} possessive, {a} attribute, {v} value
STATEMENTS: tuple[str, ...] = (
    "{Hs} {a} is {v}.",
    "The {a} of {h} is {v}.",
    "{H} said the {a} was {v}.",
    "For the record, {hs} {a} is {v}.",
    "{H} changed the {a} to {v} last week.",
    "Keep in mind that {hs} {a} is {v}.",
    "{H} uses {v} as the {a}.",
    "The {a} that {h} gave me is {v}.",
    "If anyone asks, {hs} {a} is {v}.",
    "{H} wrote {v} on a card: that is the {a}.",
    "According to {h}, the {a} is {v}.",
    "{Hs} {a}, by the way, is {v}.",
    "Do not forget: {hs} {a} is {v}.",
    "{H} told everyone the {a} is {v}.",
    "{H} picked {v} for the {a}.",
    "It turns out {hs} {a} is {v}.",
)
# (question, answer lead-in)
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is {hs} {a}?", "{Hs} {a} is"),
    ("Which number did {h} give for the {a}?", "The number was"),
    ("Tell me the {a} of {h}.", "The {a} of {h} is"),
    ("Do you remember {hs} {a}?", "Yes, it is"),
    ("What {a} does {h} have?", "{H} has the {a}"),
    ("Question: {hs} {a}? Answer:", ""),
    ("What was the {a} {h} mentioned?", "It was"),
    ("Can you recall {hs} {a}?", "Sure, {hs} {a} is"),
    ("Look back at the text. What is the {a} of {h}?", "The answer is"),
    ("What did {h} set as the {a}?", "{H} set it to"),
    ("Remind me of {hs} {a}.", "{Hs} {a} is"),
    ("What is the {a} belonging to {h}?", "It is"),
)
SPLITS = ("train", "held_out")


def split_items(items: Sequence, split: str) -> list:
    """The part of ``items`` that ``split`` draws from: every fourth item (indices 3, 7, ...) is held out.

    Raises:
        ValueError: ``split`` not one of `SPLITS`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {SPLITS}")
    return [x for i, x in enumerate(items) if (i % 4 == 3) == (split == "held_out")]


def _possessive(holder: str) -> str:
    return holder + ("'" if holder.endswith("s") else "'s")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def draw_value(rng: random.Random) -> str:
    """A 3-8 digit number (five times in six) or a letter-digit code such as ``KT-4071``."""
    if rng.random() < 5 / 6:
        return random_number(rng, rng.randint(3, 8))
    return f"{rng.choice(CODE_LETTERS)}{rng.choice(CODE_LETTERS)}-{rng.randint(100, 9999)}"


def compose_fact(rng: random.Random, split: str = "train", holder: str | None = None,
                 attribute: str | None = None, value: str | None = None) -> Fact:
    """A fact composed from ``split``'s holders, attributes, statements and questions (`split_items`).

    ``holder``/``attribute``/``value`` fix those parts (e.g. distinct holders for distractors); the rest is drawn
    from ``rng``.

    Raises:
        ValueError: ``split`` not one of `SPLITS`.
    """
    holders, attributes = split_items(HOLDERS, split), split_items(ATTRIBUTES, split)
    statement, (question, lead) = rng.choice(split_items(STATEMENTS, split)), rng.choice(split_items(QUESTIONS, split))
    h = holder if holder is not None else rng.choice(holders)
    a = attribute if attribute is not None else rng.choice(attributes)
    v = value if value is not None else draw_value(rng)
    parts = dict(H=_cap(h), h=h, Hs=_cap(_possessive(h)), hs=_possessive(h), a=a)
    fact = Fact.from_template(statement, question, lead, v, holder=h, attribute=a, **parts)
    return check_training_fact(fact)  # never the retrieval evaluation's held-out phrasings (beacon_peft.eval_facts)


def compose_facts(rng: random.Random, n: int, split: str = "train") -> list[Fact]:
    """``n`` facts with distinct holders and distinct values (distractors for one another: a question names the
    holder, and often the attribute, of exactly one of them).

    Raises:
        ValueError: ``n`` not in [1, number of ``split``'s holders], or a bad ``split``.
    """
    holders = split_items(HOLDERS, split)
    if not isinstance(n, int) or not 1 <= n <= len(holders):
        raise ValueError(f"n={n!r}: allowed an int in [1, {len(holders)}] (the {split} split's holders)")
    facts, values = [], set()
    attribute = rng.choice(split_items(ATTRIBUTES, split)) if rng.random() < 0.5 else None  # same kind, or mixed
    for h in rng.sample(holders, n):
        v = draw_value(rng)
        while v in values:
            v = draw_value(rng)
        values.add(v)
        facts.append(compose_fact(rng, split, holder=h, attribute=attribute, value=v))
    return facts


def training_phrasings(evaluation: bool = True) -> list[str]:
    """Every needle, question and answer lead-in template a training row can hold (fields as ``{...}``): the
    synthetic templates (all ten: ``recipes/train.py``'s retrieval data uses every one), the composed phrasings of
    both splits, the pass-key facts, and (``evaluation``) `beacon_peft.eval_facts`' training split, which no
    training row uses yet but may. A test checks that none of them holds a held-out phrasing of the evaluation."""
    from . import synthetic

    out = [t for template in (*synthetic.TEMPLATES, PASS_KEY, NAMED_PASS_KEY) for t in template]
    out += list(STATEMENTS) + [t for pair in QUESTIONS for t in pair]
    for kind in eval_facts.KINDS if evaluation else ():
        out += eval_facts.split_items(eval_facts.STATEMENTS[kind], "train")
        out += [t for pair in eval_facts.split_items(eval_facts.QUESTIONS[kind], "train") for t in pair]
    return out
