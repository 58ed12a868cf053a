"""Facts hidden in long contexts: the needles, questions and answers that probe a beacon adapter's memory.

Activation Beacon (arXiv 2401.03462) reads a long context window by window and condenses each completed window's
activations into a few beacons; what a question after the context can still recall of an earlier window is what
those beacons kept. The paper measures that with needle-in-a-haystack tests (the pass key, §4) and fine-tunes on
synthetic long-context QA (§3.3). Both hide a *fact* in prose and ask for it afterwards:

* a **needle**, the sentence stating the fact (``"The pass key is 68213. Remember it. 68213 is the pass key."``),
  inserted into the haystack framed by spaces (`Fact.inserted`);
* a **question** and its answer **lead-in** (``"What is the pass key?"`` / ``"The pass key is"``), asked after a
  blank line at the end of the context (`Fact.asked`);
* the **answer**, the fact's ``value`` (``"68213"``), which the model should continue the lead-in with.

This module is the one place those texts live: the `Fact` type, the pass-key fact (`pass_key_fact`, the needle of
the benchmarks, the demo and the read-back probe), the intros put before a haystack, the names and the letters that
facts are drawn from, and `needle_compressed`, whether a needle lies in a completed (compressed) window when the
answer is read. The training data (`beacon_peft.training.synthetic`, `beacon_peft.training.phrasings`,
`beacon_peft.training.readback`), the benchmarks (``beacon_peft/needles.py``) and ``beacon-peft demo`` build
their facts from it, so one phrasing change shows in all of them at once.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Mapping

# The intro of the paper's pass-key test, put before the haystack by the benchmarks and (one of `INTROS`) by the
# synthetic training rows.
QUIZ_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
              "Find it and memorize it. I will quiz you about it.\n\n")
# The shorter intro of ``beacon-peft demo`` (and the shipped adapter's tests built on it).
PASS_KEY_INTRO = "There is a pass key hidden in the text below. Find it and memorize it.\n\n"
# The intros a synthetic training row starts with (one drawn per row): the quiz intro, a plain one, none.
INTROS = (QUIZ_INTRO, "Read the following text carefully; a question about it follows.\n\n", "")

# People a fact can be about: the synthetic templates draw from all of them, the multi-key benchmark from the first
# 16 (`beacon_peft.needles.NAMES`).
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Louis",
         "Maria", "Nathan", "Olivia", "Peter", "Quentin", "Rosa", "Samuel", "Tara", "Umar", "Vera", "Walter", "Yuki")
# The letters of letter-digit codes such as ``KT-4071`` (no I and no O, which read as 1 and 0).
CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
# A token whose text ends with one of these ends a sentence or a line: a needle goes right after one.
SENTENCE_ENDS = (".", "!", "?", "\n")

# Fact templates ``(needle, question, lead-in)``: ``{v}`` is the value, ``{s}`` the subject (`Fact.from_template`).
PASS_KEY = ("The pass key is {v}. Remember it. {v} is the pass key.", "What is the pass key?", "The pass key is")
NAMED_PASS_KEY = ("The pass key for {s} is {v}. Remember it. {v} is the pass key for {s}.",
                  "What is the pass key for {s}?", "The pass key for {s} is")  # the multi-key benchmark's


@dataclass(frozen=True)
class Fact:
    """One fact: ``needle`` is the sentence stating ``value``; ``question`` asks for it and ``lead`` is the answer's
    lead-in (may be empty); the answer is ``value``.

    ``cue`` is the needle's text before the value and ``rest`` its text from the value on, so ``needle == cue + " "
    + rest`` where the value does not open the sentence (the read-back stage's recall rows quote the cue and score
    the rest). ``holder`` and ``attribute`` name what the fact is about where it has them (``"Maria"``, ``"door
    code"``; empty otherwise).
    """

    needle: str
    cue: str
    rest: str
    question: str
    lead: str
    value: str
    holder: str = ""
    attribute: str = ""

    @classmethod
    def from_template(cls, needle: str, question: str, lead: str, value: str, *, holder: str = "",
                      attribute: str = "", **parts: str) -> Fact:
        """The fact of a template: ``needle`` holds ``{v}`` (the value, once or more) and, like ``question`` and
        ``lead``, any fields of ``parts`` (e.g. ``s="Maria"``); e.g. ``Fact.from_template(*PASS_KEY, "68213")``."""
        head, _, tail = needle.partition("{v}")
        return cls(needle=needle.format(v=value, **parts), cue=head.format(**parts).rstrip(),
                   rest=value + tail.format(v=value, **parts), question=question.format(**parts),
                   lead=lead.format(**parts), value=value, holder=holder, attribute=attribute)

    @property
    def inserted(self) -> str:
        """The needle as it goes into the haystack: framed by spaces."""
        return " " + self.needle + " "

    @property
    def asked(self) -> str:
        """The question as it follows the context: after a blank line, then the lead-in (when there is one)."""
        return "\n\n" + self.question + (" " + self.lead if self.lead else "")

    @property
    def completion(self) -> str:
        """The answer as a training row scores it after `asked`: ``" " + value + "."``."""
        return " " + self.value + "."


def pass_key_fact(key: str) -> Fact:
    """The paper's pass-key fact (`PASS_KEY`): ``pass_key_fact("68213").inserted`` is ``" The pass key is 68213.
    Remember it. 68213 is the pass key. "`` and ``.asked`` is ``"\\n\\nWhat is the pass key? The pass key is"``."""
    return Fact.from_template(*PASS_KEY, key)


def named_pass_key_fact(name: str, key: str) -> Fact:
    """The pass key of a person (`NAMED_PASS_KEY`, the multi-key benchmark's needles)."""
    return Fact.from_template(*NAMED_PASS_KEY, key, holder=name, s=name)


def random_number(rng: random.Random, digits: int) -> str:
    """A number of exactly ``digits`` digits drawn from ``rng`` (one ``randint``): a pass key or a fact's value."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def as_passkey_template(fact: Fact) -> tuple[str, str]:
    """``(needle, question)`` for `beacon_peft.needles.make_passkey_case`: ``fact``'s `Fact.inserted` with
    ``{key}`` where the value was (other braces escaped), and its `Fact.asked`."""
    needle = " " + fact.needle.replace("{", "{{").replace("}", "}}").replace(fact.value, "{key}") + " "
    return needle, fact.asked


def check_phrasing(needle: str, question: str) -> None:
    """Raise ``ValueError`` unless ``needle`` is a template whose only field is ``{key}`` and ``question`` is text."""
    if not isinstance(needle, str) or not isinstance(question, str):
        raise TypeError(f"needle={needle!r}, question={question!r}: allowed strings")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(needle) if f is not None]
    except ValueError:  # unbalanced braces
        fields = []
    if not fields or set(fields) != {"key"}:
        raise ValueError(f"needle={needle!r}: allowed a template whose only field is {{key}} (at least once)")
    if not question.strip():
        raise ValueError(f"question={question!r}: allowed non-empty text")


def needle_compressed(needle_end: int | Mapping, n_prompt: int, window: int, stride: int) -> bool:
    """Whether a needle ending at token ``needle_end`` (or a case's ``"needle_token_end"``) lies in a completed,
    compressed window when the token after ``n_prompt`` prompt tokens is predicted, i.e. whether the answer can come
    only from the beacons' memory and not from raw tokens.

    Windows cover raw tokens ``[k * stride, k * stride + window)``; the answer's first token is predicted at
    position ``n_prompt - 1``, inside the window starting at ``stride * ((n_prompt - 1) // stride)``; a completed
    window keeps its last ``window - stride`` raw activations (the overlap) as the start of the next one, so the
    compressed part ends ``window - stride`` tokens before that window starts.
    """
    if isinstance(needle_end, Mapping):
        needle_end = needle_end["needle_token_end"]
    reading = n_prompt - 1  # the position whose output predicts the first answer token
    completed_end = stride * (reading // stride) - (window - stride)
    return needle_end <= completed_end
