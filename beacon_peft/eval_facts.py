"""The retrieval evaluation's facts: needles of four kinds, nine phrasings each, a held-out part no training row uses.

Activation Beacon (arXiv 2401.03462) is judged by what a question after a long context can still recall of a
compressed window (§4, needle in a haystack). A reader trained on a few phrasings can learn those phrasings rather
than the memory: the shipped SmolLM2 adapter answered its training templates well and a needle written in
documentation prose badly (issue 39). This module holds the facts of the evaluation that tells the two apart
(``benchmarks/retrieval/heldout.py``):

* four **kinds** of value (`KINDS`): a number of 4-7 digits, a person's name, a date, a short code (``QXT-482``);
* for each kind nine **statements** (the needle, about a *thing*: a door, a post, an event, an item) and nine
  **questions** with their answer lead-ins, worded unlike one another and unlike every training template;
* a **split** (`split_items`): phrasings 2, 5 and 8 of every list are *held out*. A held-out case states and asks its
  fact in held-out phrasings only. No training row may use them: `check_training_fact` refuses a training fact whose
  needle or question matches a held-out phrasing (`held_out_match`), and the training generators
  (`beacon_peft.training.synthetic.template_fact`, `beacon_peft.training.phrasings.compose_fact`) call it on every
  fact they make; `beacon_peft.training.phrasings.training_phrasings` lists every phrasing a training row can hold,
  so a test can check them all.

`template_leak` finds, in a generated answer, text of a training template that the case itself did not contain (the
``"Remember it."`` of the pass-key needle going on after an answer): the evaluation reports the share of answers that
leak one.
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

from .facts import Fact, random_number

__all__ = ["KINDS", "SPLITS", "HELD_OUT_INDICES", "THINGS", "STATEMENTS", "QUESTIONS", "EVAL_INTRO", "split_items",
           "draw_value", "eval_fact", "held_out_match", "check_training_fact", "FUNCTION_WORDS", "template_fragments",
           "template_leak", "extract_answer", "units_in_place"]

KINDS = ("number", "name", "date", "code")
SPLITS = ("train", "held_out")
HELD_OUT_INDICES = (2, 5, 8)  # of every list of nine phrasings

# The intro of an evaluation context: worded unlike the training intros (`beacon_peft.facts.INTROS`).
EVAL_INTRO = "The notes below were collected over several months. Some details in them will be asked about later.\n\n"

# What a fact is about, by kind ({t}; {T} capitalised). None of them is a holder of `training.phrasings`.
THINGS: dict[str, tuple[str, ...]] = {
    "number": ("the storage room", "the east gate", "the boiler cupboard", "the roof hatch", "the archive vault",
               "the bicycle shed", "the server cabinet", "the wine cellar", "the chapel tower", "the loading dock"),
    "name": ("the harbour master", "the chief archivist", "the new bursar", "the ferry captain", "the choir leader",
             "the village notary", "the head of the lab", "the station manager", "the tour guide", "the beekeeper"),
    "date": ("the bridge opening", "the first harvest fair", "the signing of the lease", "the museum fire",
             "the launch of the ferry", "the founding of the club", "the great flood", "the last tram ride",
             "the merger vote", "the library's reopening"),
    "code": ("the blue suitcase", "the spare laptop", "the oak cabinet", "the broken telescope", "the canvas tent",
             "the brass lantern", "the red toolbox", "the violin case", "the weather station", "the old projector"),
}
# Needles: {v} the value, {t} / {T} the thing. Indices 2, 5, 8 are held out.
STATEMENTS: dict[str, tuple[str, ...]] = {
    "number": (
        "The access number for {t} is {v}.",
        "{T} can be opened with the number {v}.",
        "Whoever needs to get into {t} should dial {v}.",
        "The number printed under {t} reads {v}.",
        "To reach {t}, call extension {v}.",
        "A small brass plate on {t} shows the figures {v}.",
        "The maintenance log lists {t} under number {v}.",
        "For {t}, the reference number is {v}.",
        "Scribbled in pencil beside {t} were the digits {v}.",
    ),
    "name": (
        "The post of {t} went to {v}.",
        "{v} works as {t}.",
        "Everyone in the valley knew {t} by the name {v}.",
        "The letter was signed by {t}, {v}.",
        "{T} is called {v}.",
        "When the inspector asked who {t} was, the reply was {v}.",
        "Last spring {v} became {t}.",
        "The staff list gives {t} as {v}.",
        "The nameplate on the door of {t} reads {v}.",
    ),
    "date": (
        "{T} took place on {v}.",
        "The date of {t} was {v}.",
        "Old newspapers put {t} on {v}.",
        "{T} happened on {v}.",
        "On {v}, {t} finally happened.",
        "The archive card for {t} is stamped {v}.",
        "Records show {t} on {v}.",
        "{T} is remembered as falling on {v}.",
        "Ask anyone in town and they will tell you {t} came on {v}.",
    ),
    "code": (
        "The label on {t} says {v}.",
        "{T} is filed under code {v}.",
        "Stencilled across the side of {t}, in faded paint, is {v}.",
        "{T} carries the tag {v}.",
        "The inventory code of {t} is {v}.",
        "Nobody could find {t} until someone searched the catalogue for {v}.",
        "{T} was shipped as item {v}.",
        "The code assigned to {t} is {v}.",
        "Whatever else you forget, {t} goes by {v} in the stock room.",
    ),
}
# (question, answer lead-in); indices 2, 5, 8 are held out.
QUESTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "number": (
        ("What is the access number for {t}?", "The access number is"),
        ("Which number opens {t}?", "The number is"),
        ("What should whoever needs to get into {t} dial?", "Whoever needs to get into {t} should dial"),
        ("What number is printed under {t}?", "It reads"),
        ("What extension reaches {t}?", "The extension is"),
        ("Which figures does the small brass plate on {t} show?", "The small brass plate on {t} shows the figures"),
        ("Under which number does the maintenance log list {t}?", "Number"),
        ("What is the reference number for {t}?", "The reference number is"),
        ("Which digits were scribbled in pencil beside {t}?", "Scribbled in pencil beside {t} were the digits"),
    ),
    "name": (
        ("Who is {t}?", "{T} is"),
        ("What is the name of {t}?", "The name is"),
        ("By what name did everyone in the valley know {t}?", "Everyone in the valley knew {t} by the name"),
        ("Who signed as {t}?", "It was signed by"),
        ("What is {t} called?", "{T} is called"),
        ("What was the reply when the inspector asked who {t} was?",
         "When the inspector asked who {t} was, the reply was"),
        ("Who became {t}?", "It was"),
        ("Whom does the staff list give as {t}?", "The staff list gives"),
        ("What does the nameplate on the door of {t} read?", "The nameplate on the door of {t} reads"),
    ),
    "date": (
        ("When did {t} take place?", "It took place on"),
        ("What was the date of {t}?", "The date was"),
        ("On which date do old newspapers put {t}?", "Old newspapers put {t} on"),
        ("When did {t} happen?", "It happened on"),
        ("On what date did {t} finally happen?", "On"),
        ("Which date is stamped on the archive card for {t}?", "The archive card for {t} is stamped"),
        ("What date do the records show for {t}?", "The records show"),
        ("What day is {t} remembered as falling on?", "It fell on"),
        ("When, as anyone in town will tell you, did {t} come?",
         "Ask anyone in town and they will tell you {t} came on"),
    ),
    "code": (
        ("What does the label on {t} say?", "The label says"),
        ("Under which code is {t} filed?", "It is filed under"),
        ("What is stencilled across the side of {t}?", "Stencilled across the side of {t}, in faded paint, is"),
        ("What tag does {t} carry?", "The tag is"),
        ("What is the inventory code of {t}?", "The inventory code is"),
        ("What did someone search the catalogue for to find {t}?",
         "Nobody could find {t} until someone searched the catalogue for"),
        ("As which item was {t} shipped?", "Item"),
        ("What code is assigned to {t}?", "The code is"),
        ("By what code does {t} go in the stock room?", "In the stock room, {t} goes by"),
    ),
}
FIRST_NAMES = ("Marguerite", "Anselm", "Ottoline", "Cosmo", "Leocadia", "Thaddeus", "Ysolde", "Barnaby", "Philippa",
               "Evander", "Rosalind", "Ignatius", "Clementine", "Augustin", "Henrietta", "Lorcan")
SURNAMES = ("Vandermeer", "Okonkwo", "Castellanos", "Pemberton", "Szymanski", "Achterberg", "Fairweather", "Quiroga",
            "Halvorsen", "Delacroix", "Abernathy", "Nakashima", "Ferreira", "Whitlock", "Brennan", "Oyelaran")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I and O (read as 1 and 0)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: allowed {KINDS}")


def split_items(items: Sequence, split: str) -> list:
    """The part of ``items`` (a list of nine phrasings) that ``split`` draws from: `HELD_OUT_INDICES` for
    ``"held_out"``, the other six for ``"train"``.

    Raises:
        ValueError: ``split`` not one of `SPLITS`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {SPLITS}")
    return [x for i, x in enumerate(items) if (i in HELD_OUT_INDICES) == (split == "held_out")]


def draw_value(rng: random.Random, kind: str) -> str:
    """A value of ``kind``: a 4-7 digit number, ``"First Surname"``, ``"14 March 1987"`` or ``"QXT-482"``.

    Raises:
        ValueError: unknown ``kind``.
    """
    _check_kind(kind)
    if kind == "number":
        return random_number(rng, rng.randint(4, 7))
    if kind == "name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    if kind == "date":
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 2029)}"
    return "".join(rng.choice(_CODE_LETTERS) for _ in range(3)) + f"-{rng.randint(100, 999)}"


def eval_fact(rng: random.Random, kind: str, split: str = "held_out") -> Fact:
    """A fact of ``kind`` stated and asked in ``split``'s phrasings (thing, statement, question and value drawn
    from ``rng``); ``holder`` is the thing, ``attribute`` the kind.

    Raises:
        ValueError: unknown ``kind`` or ``split``.
    """
    _check_kind(kind)
    statement = rng.choice(split_items(STATEMENTS[kind], split))
    question, lead = rng.choice(split_items(QUESTIONS[kind], split))
    thing = rng.choice(THINGS[kind])
    value = draw_value(rng, kind)
    parts = dict(t=thing, T=thing[:1].upper() + thing[1:])
    return Fact.from_template(statement, question, lead, value, holder=thing, attribute=kind, **parts)


def _pattern(template: str) -> re.Pattern:
    """A template's text as a regex: its fields (``{t}``, ``{v}``, ...) match any short text, the rest literally."""
    pieces = re.split(r"\{\w+\}", template)
    return re.compile(r".{1,80}?".join(re.escape(p) for p in pieces), re.IGNORECASE)


_HELD_OUT_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (template, _pattern(template))
    for kind in KINDS
    for template in [*split_items(STATEMENTS[kind], "held_out"),
                     *(question for question, _ in split_items(QUESTIONS[kind], "held_out"))]
)


def held_out_match(text: str) -> str | None:
    """The held-out phrasing (statement or question template) that ``text`` holds, or None."""
    for template, pattern in _HELD_OUT_PATTERNS:
        if pattern.search(text):
            return template
    return None


def check_training_fact(fact: Fact) -> Fact:
    """``fact`` unchanged when its needle and question hold no held-out phrasing (`held_out_match`): a training
    generator calls this on every fact it makes, so no training row can state or ask a fact the held-out way.

    Raises:
        ValueError: ``fact`` holds a held-out phrasing (named).
    """
    for text in (fact.needle, fact.question):
        found = held_out_match(text)
        if found is not None:
            raise ValueError(f"training fact {text!r} uses the evaluation's held-out phrasing {found!r} "
                             "(beacon_peft.eval_facts): no training row may")
    return fact


# Words that say nothing of a template on their own: a piece made only of them ("what is the") is no evidence.
FUNCTION_WORDS = frozenset("a an the is was are were it its what which who whom where when how does did do you i "
                           "of in on at for to by with from that this as and or yes no can me tell".split())


def template_fragments(templates: Iterable[str], min_words: int = 2, min_chars: int = 9) -> list[str]:
    """The literal pieces of ``templates`` between their fields, lower-cased and stripped of edge punctuation, that
    have at least ``min_words`` words and ``min_chars`` characters and a word not in `FUNCTION_WORDS`
    (``"remember it"``, ``"is the pass key"``; not ``"what is the"``)."""
    out = set()
    for template in templates:
        for piece in re.split(r"\{\w+\}", template):
            piece = re.sub(r"\s+", " ", piece.lower()).strip(" .,:;!?'\"")
            words = re.findall(r"[a-z']+", piece)
            if len(words) >= min_words and len(piece) >= min_chars and set(words) - FUNCTION_WORDS:
                out.add(piece)
    return sorted(out)


def template_leak(generated: str, prompt_text: str, fragments: Sequence[str]) -> str | None:
    """The first training-template fragment (`template_fragments`) that ``generated`` holds and the case's own
    text ``prompt_text`` (its needle, question and lead-in) does not, or None."""
    text, prompt = re.sub(r"\s+", " ", generated.lower()), re.sub(r"\s+", " ", prompt_text.lower())
    for fragment in fragments:
        if fragment in text and fragment not in prompt:
            return fragment
    return None


_ANSWER_PATTERNS = {
    "number": re.compile(r"\d+"),
    "name": re.compile(r"[A-Z][\w'-]+(?: [A-Z][\w'-]+)+"),
    "date": re.compile(r"\d{1,2} [A-Za-z]+,? \d{1,4}|[A-Za-z]+ \d{1,2},? \d{1,4}|\d{1,2} [A-Za-z]+|\d+"),
    "code": re.compile(r"[A-Z0-9]+(?:-[A-Z0-9]+)+|[A-Z]*\d[A-Z0-9]*"),
}


def extract_answer(generated: str, kind: str) -> str:
    """The first value of ``kind`` in a generated answer ("" when none): the first number written; the first run
    of two or more capitalised words; the first date-like span; the first code-like span (``QXT-482``)."""
    _check_kind(kind)
    match = _ANSWER_PATTERNS[kind].search(generated)
    return "" if match is None else match.group(0)


def units_in_place(answer: str, value: str) -> int:
    """How many of ``value``'s characters ``answer`` (an `extract_answer` result) has at the same position (the
    issue's "digits in place": 66817 answered 6781 has 3, 6/8/1 at places 1, 3, 4)."""
    return sum(a == b for a, b in zip(answer, value))
