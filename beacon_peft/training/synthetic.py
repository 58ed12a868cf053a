"""Synthetic long-context retrieval / QA examples for the fine-tuning stage of a beacon adapter.

The paper (arXiv 2401.03462, §3.3) fine-tunes the beacons after the plain-text stage on long-context QA, so that a
question after the compressed memory is answered from facts that only the beacons' activations still hold. Offline
we synthesise that data from the training texts: a haystack of real prose (never a held-out essay), one or more
*needles* (short facts: a pass key, a magic number, a person's code or city, ...) inserted at sentence boundaries at
random depths, and a question that ends in the answer's lead-in, e.g.::

    prompt     = [intro] haystack[:p] + " The secret code for Maria is 4071. " + haystack[p:]
                 + "\\n\\nWhat is the secret code for Maria? The secret code for Maria is"
    completion = " 4071."

Phrasings, value kinds (3-7 digit numbers, words, letter-digit codes), the number of needles (distractors with
other subjects and values), whether the intro or a repeated needle is present, and the depth all vary, so the
beacons learn to keep *whatever fact* a window holds rather than one template. Everything is a pure function of
``seed``. Lengths are exact in tokens of the given tokenizer (up to re-tokenization at the text boundaries).

A needle, its question and answer are a `beacon_peft.facts.Fact`; the pass-key template, the people, the intros and
the code letters are `beacon_peft.facts`' (shared with the benchmarks and the demo).
"""

from __future__ import annotations

import random
from typing import Sequence

from ..eval_facts import check_training_fact
from ..facts import CODE_LETTERS, INTROS, NAMES, PASS_KEY, SENTENCE_ENDS, Fact, random_number

# (needle, question, answer lead-in); {s} is the subject, {v} the value. Subject-free templates take no
# distractors of their own kind.
TEMPLATES: tuple[tuple[str, str, str], ...] = (
    PASS_KEY,  # the paper's pass key, the benchmarks' and the demo's needle
    ("The special magic number is {v}.", "What is the special magic number?", "The special magic number is"),
    ("The secret code for {s} is {v}.", "What is the secret code for {s}?", "The secret code for {s} is"),
    ("The pass key for {s} is {v}. Remember it.", "What is the pass key for {s}?", "The pass key for {s} is"),
    ("{s}'s lucky number is {v}.", "What is {s}'s lucky number?", "{s}'s lucky number is"),
    ("Note: the password of the {s} account is {v}.", "What is the password of the {s} account?",
     "The password of the {s} account is"),
    ("{s} keeps the spare key in the {v}.", "Where does {s} keep the spare key?", "{s} keeps the spare key in the"),
    ("The best thing to do in {s} is to visit the {v}.", "What is the best thing to do in {s}?",
     "The best thing to do in {s} is to visit the"),
    ("Remember this: {s} was born in {v}.", "Where was {s} born?", "{s} was born in"),
    ("The meeting with {s} is in room {v}.", "In which room is the meeting with {s}?",
     "The meeting with {s} is in room"),
)
VALUE_KIND = ("number", "number", "number", "number", "number", "code", "word", "word", "city", "number")
PEOPLE = NAMES
PLACES = ("Lisbon", "Kyoto", "Oslo", "Cairo", "Lima", "Dublin", "Hanoi", "Nairobi", "Quebec", "Tbilisi", "Porto",
          "Zagreb", "Austin", "Bergen", "Seville", "Krakow")
ACCOUNTS = ("email", "bank", "server", "office", "garage", "archive", "library", "studio")
WORDS = ("drawer", "garden shed", "blue vase", "glove box", "piano", "old boot", "bread bin", "teapot", "mailbox",
         "toolbox", "bookshelf", "flower pot")
SIGHTS = ("harbour", "castle", "old market", "botanical garden", "cathedral", "museum", "lighthouse", "bridge")


def _subject_pool(template: int) -> Sequence[str]:
    needle = TEMPLATES[template][0]
    if "{s} account" in needle:
        return ACCOUNTS
    if "thing to do in {s}" in needle:
        return PLACES
    return PEOPLE


def _value(rng: random.Random, template: int) -> str:
    kind = VALUE_KIND[template]
    if kind == "number":
        return random_number(rng, rng.randint(3, 7))
    if kind == "code":
        return f"{rng.choice(CODE_LETTERS)}{rng.choice(CODE_LETTERS)}-{rng.randint(100, 999)}"
    if kind == "city":
        return rng.choice(PLACES)
    pool = SIGHTS if "visit the" in TEMPLATES[template][0] else WORDS
    return rng.choice(pool)


def template_pool(templates: Sequence[int] | None) -> list[int]:
    """``templates`` (indices into `TEMPLATES`; None: all) as a checked list.

    Raises:
        ValueError: an empty list, or an index outside ``[0, len(TEMPLATES) - 1]``.
    """
    pool = list(range(len(TEMPLATES))) if templates is None else list(templates)
    if not pool or any(not isinstance(t, int) or not 0 <= t < len(TEMPLATES) for t in pool):
        raise ValueError(f"templates={templates!r} must be a non-empty list of indices in [0, {len(TEMPLATES) - 1}]")
    return pool


def template_fact(template: int, subject: str, value: str) -> Fact:
    """The `Fact` of `TEMPLATES` ``[template]`` about ``subject`` ("" for a subject-free template) with ``value``."""
    fact = Fact.from_template(*TEMPLATES[template], value, holder=subject, s=subject)
    return check_training_fact(fact)  # never the evaluation's held-out phrasings


def draw_fact(rng: random.Random, templates: Sequence[int] | None = None) -> tuple[str, str]:
    """A random needle from ``templates`` (indices into `TEMPLATES`, default all) as ``(cue, rest)``: its text up to
    the value and from the value on, e.g. ``("The secret code for Maria is", "4071.")``; the needle reads
    ``cue + " " + rest`` (`Fact.cue`, `Fact.rest`). The recall rows of the read-back stage quote the cue and score
    the rest."""
    pool = template_pool(templates)
    template = rng.choice(pool)
    subject = rng.choice(_subject_pool(template)) if "{s}" in TEMPLATES[template][0] else ""
    fact = template_fact(template, subject, _value(rng, template))
    return fact.cue, fact.rest


_BOUNDARIES: dict[tuple[int, int], frozenset[int]] = {}


def boundary_ids(tokenizer) -> frozenset[int]:
    """Token ids whose text ends a sentence or line (``. ! ? \\n``): a needle goes right after one.

    Decoding the whole vocabulary takes about a second, so the set is kept per tokenizer object."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _BOUNDARIES:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _BOUNDARIES[key] = frozenset(i for i, t in enumerate(texts) if t.rstrip(" ").endswith(SENTENCE_ENDS))
    return _BOUNDARIES[key]


def token_stream(tokenizer, documents: Sequence[str], n: int, min_tokens: int, longest: int,
                 stream: Sequence[int] | None = None) -> Sequence[int]:
    """The non-empty ``documents`` as one token stream (each followed by a blank line), after checking the sizes:
    ``n >= 1`` rows of ``min_tokens``..``longest`` tokens (``min_tokens >= 64``)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not 64 <= min_tokens <= longest:
        raise ValueError(f"min_tokens={min_tokens} must be in [64, {longest}] for these max_tokens")
    if stream is None:  # callers drawing many blocks tokenize once and pass the stream
        encoded = tokenizer([d + "\n\n" for d in documents if d.strip()], add_special_tokens=False)["input_ids"]
        stream = [t for ids in encoded for t in ids]
    if not stream:
        raise ValueError("no document text to build examples from")
    return stream


def retrieval_examples(tokenizer, documents: Sequence[str], n: int, min_tokens: int, max_tokens: int,
                       seed: int = 0, max_needles: int = 4, ask_all: bool = False,
                       templates: Sequence[int] | None = None, as_ids: bool = False,
                       stream: Sequence[int] | None = None) -> list[dict]:
    """``n`` retrieval examples ``{"prompt", "completion", "template", "depth", "n_needles", "n_questions",
    "needle_token_end"}``.

    The prompt (intro, haystack with needles, question and lead-in) is about ``min_tokens``..``max_tokens - 8``
    tokens, drawn uniformly; the haystack is a random stretch of the concatenated ``documents`` (cycled). The
    queried needle's ``depth`` is its position in the haystack in [0, 1]; one example in four has it in the last
    sixth of the context, the rest anywhere before; ``needle_token_end`` is where that needle ends in the prompt's
    tokens (``prompt_ids``), so a caller can tell whether it sits in a compressed window.

    ``ask_all``: after the first answer the completion asks about every other needle (distractors included) in
    random order, each question followed by its answer, ``"\n\n" + question + " " + lead-in + " " + value + "."``;
    so one compressed context yields ``n_questions`` labelled answers instead of one. The extra questions and
    answers come out of the same length budget (the haystack is shorter by their tokens).

    ``templates``: indices into `TEMPLATES` to draw needles from (default all), so that some phrasings can be held
    out of training and scored as unseen. ``stream``: ``documents`` already tokenized (each followed by a blank line,
    concatenated), so that a caller drawing many blocks tokenizes them once. ``as_ids``: also return
    ``prompt_ids``/``completion_ids`` and leave ``prompt`` empty (no decode/re-encode round trip, for generating
    rows on the fly).

    Raises:
        ValueError: ``n < 1``, ``min_tokens`` not in [64, max_tokens - 8], no document text, or a template
            index outside ``[0, len(TEMPLATES) - 1]``.
    """
    pool = template_pool(templates)
    if not 1 <= max_needles <= len(ACCOUNTS):
        raise ValueError(f"max_needles={max_needles} must be in [1, {len(ACCOUNTS)}]")
    stream = token_stream(tokenizer, documents, n, min_tokens, max_tokens - 8, stream)
    boundaries = boundary_ids(tokenizer)
    rng = random.Random(seed)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    examples = []
    for _ in range(n):
        template = rng.choice(pool)
        needle_t = TEMPLATES[template][0]
        has_subject = "{s}" in needle_t
        n_needles = rng.randint(1, max_needles) if has_subject else 1
        subjects = rng.sample(_subject_pool(template), n_needles) if has_subject else [""]
        values: list[str] = []
        while len(values) < n_needles:
            v = _value(rng, template)
            if v not in values:
                values.append(v)
        facts = [template_fact(template, s, v) for s, v in zip(subjects, values)]
        if not has_subject and rng.random() < 0.3:  # a distractor fact of another kind
            with_subject = [k for k in pool if "{s}" in TEMPLATES[k][0]]
            other = rng.choice(with_subject or [k for k, t in enumerate(TEMPLATES) if "{s}" in t[0]])
            facts.append(template_fact(other, rng.choice(_subject_pool(other)), _value(rng, other)))
        needles = [encode(f.inserted) for f in facts]
        query = rng.randrange(n_needles)
        later = [k for k in range(len(facts)) if k != query] if ask_all else []
        rng.shuffle(later)
        completion = facts[query].completion + "".join(facts[k].asked + facts[k].completion for k in later)
        intro = encode(rng.choice(INTROS))
        question = encode(facts[query].asked)
        extra = len(encode(completion)) - 4 if later else 0  # the later questions and answers, in tokens
        total = rng.randint(min_tokens, max_tokens - 8) - extra
        n_fill = max(16, total - len(intro) - len(question) - sum(map(len, needles)))
        start = rng.randrange(len(stream))
        filler = [stream[(start + i) % len(stream)] for i in range(n_fill)]
        cuts = [i for i in range(1, n_fill) if filler[i - 1] in boundaries] or list(range(1, n_fill))
        # depth of the queried needle: mostly inside what will be compressed, sometimes near the question
        target = rng.uniform(5 / 6, 1.0) if rng.random() < 0.25 else rng.uniform(0.0, 5 / 6)
        points = [rng.choice(cuts) for _ in needles]  # distractors anywhere
        points[query] = min(cuts, key=lambda c: abs(c - target * n_fill))
        order = sorted(range(len(needles)), key=lambda k: (points[k], k != query))
        ids, prev, needle_end = list(intro), 0, 0
        for k in order:
            ids += filler[prev : points[k]] + needles[k]
            prev = points[k]
            if k == query:
                needle_end = len(ids)  # the queried needle's end in the prompt's tokens
        ids += filler[prev:] + question
        row = dict(prompt="" if as_ids else tokenizer.decode(ids), completion=completion, template=template,
                   depth=points[query] / n_fill, n_needles=len(needles), n_questions=1 + len(later),
                   needle_token_end=needle_end)
        if as_ids:
            row.update(prompt_ids=ids, completion_ids=encode(completion))
        examples.append(row)
    return examples


def plain_text_examples(tokenizer, documents: Sequence[str], n: int, min_tokens: int, max_tokens: int,
                        seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt": "", "completion": text}`` of plain training text, ``min_tokens``..``max_tokens - 1``
    tokens each (a random stretch of the concatenated ``documents``): mixed into the retrieval stage they keep the
    loss on every raw token (the plain-text stage's objective), so the beacons learn to hold facts without
    forgetting how to condense prose.

    Raises:
        ValueError: ``n < 1``, ``min_tokens`` not in [64, max_tokens - 1], or no document text.
    """
    stream = token_stream(tokenizer, documents, n, min_tokens, max_tokens - 1)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length, start = rng.randint(min_tokens, max_tokens - 1), rng.randrange(len(stream))
        rows.append(dict(prompt="", completion=tokenizer.decode([stream[(start + i) % len(stream)]
                                                                  for i in range(length)])))
    return rows
