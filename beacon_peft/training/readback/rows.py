"""The read-back stage's training rows: an endless, seeded stream of mixed rows (docs/training.md, "Read-back stage").

The plain-text stage (next-token loss over prose) teaches the beacons the gist of a window; a fact's exact
tokens (a pass key's digits) carry little weight in that loss and are not kept. The rows here, with the loss terms
of `beacon_peft.training.readback.losses`, make the memory keep them:

* **Mixed rows** (`MixedRows`): an endless, seeded stream of training rows, each either plain training text
  (loss on every token) or a synthetic retrieval row (`synthetic.retrieval_examples`: needles at random depths
  in real prose, every needle asked after the haystack) whose answers are weighted apart from the prose, so the
  answers are not drowned by thousands of text tokens.
* **Recall rows** (`MixedRows`, ``recall_fraction``): whole windows of prose with a few needles (the *source*,
  compressed by the time it is read back), then quotes from it: a cue of a few tokens copied from the source (a
  sentence start, or a needle up to its value) and the source's next tokens, scored as answers. Every scored token
  of a quote is known only from the compressed memory, so a row gives hundreds of read-back targets where a
  retrieval row gives a few digits; the skill (continue, from memory, what followed a cue) is the one a question
  after a long document needs, whatever its phrasing.
* **Composed rows** (`MixedRows`, ``composed_fraction``): retrieval rows whose facts are composed from
  independent parts (`phrasings.compose_facts`: holder, attribute, statement and question patterns, training
  split only), so the memory learns to keep a stated number however it is worded; the values (not the questions)
  are scored as answers. With composed rows on, half the needles of the recall rows are composed too.
* **Kinds** (``kinds_fraction``): that share of the composed rows' facts and of the recall rows' needles comes from
  the training part of the retrieval evaluation's phrasings (`beacon_peft.eval_facts`: numbers, names, dates and
  codes about things), never from its held-out part.

`collate_rows` pads them into a batch; `training_documents` is the text they are drawn from.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Iterator, Sequence

import torch

from ... import eval_facts
from ...eval_facts import check_training_fact
from ...facts import Fact
from ...labels import IGNORE_INDEX
from ..phrasings import compose_fact, compose_facts
from ..synthetic import ACCOUNTS, INTROS, boundary_ids, draw_fact, retrieval_examples, template_pool, token_stream


def training_documents() -> list[str]:
    from beacon_peft.offline.corpora import essay_split, extra_corpora

    train, _ = essay_split()  # the held-out essays are never read here
    return [text for _, text in train] + [text for _, text in extra_corpora()]


class MixedRows(torch.utils.data.IterableDataset):
    """Endless rows ``{"input_ids", "text_labels", "answer_labels"}`` (lists of equal length, at most
    ``max_tokens``): a share ``text_fraction`` of plain text, the rest retrieval rows.

    ``text_labels`` scores the prose (every token of a plain row; the haystack of a retrieval row),
    ``answer_labels`` the answers of a retrieval row (`IGNORE_INDEX` elsewhere). Rows are drawn in blocks of
    ``block`` from a seed that depends on ``seed``, the block number and the DataLoader worker, so a run is
    reproducible and a resumed run (``start_block``) draws new rows.

    A share ``recall_fraction`` are recall rows (see the module docstring): their source is the largest whole
    number of ``window``-token windows that leaves at least ``RECALL_MIN`` tokens for quotes; the quotes' cues are
    ignored by both labels, the rest of each quote is in ``answer_labels``, the source in ``text_labels``.

    A share ``composed_fraction`` are composed retrieval rows (`_composed_row`); the rest after text, recall and
    composed rows are template retrieval rows (`synthetic.retrieval_examples`).
    """

    RECALL_MIN = 96  # the fewest tokens a recall row keeps for its quotes

    def __init__(self, tokenizer, documents: Sequence[str], min_tokens: int, max_tokens: int, seed: int = 0,
                 text_fraction: float = 0.3, templates: Sequence[int] | None = None, max_needles: int = 4,
                 block: int = 32, start_block: int = 0, recall_fraction: float = 0.0, window: int | None = None,
                 composed_fraction: float = 0.0, kinds_fraction: float = 0.0):
        super().__init__()
        templates = None if templates is None else template_pool(templates)  # checked before any row is drawn
        if not 0.0 <= text_fraction <= 1.0:
            raise ValueError(f"text_fraction={text_fraction} must be in [0, 1]")
        if not 0.0 <= recall_fraction <= 1.0 - text_fraction + 1e-9:  # 1 - 0.8 is 0.19999999999999996 in floats
            raise ValueError(f"recall_fraction={recall_fraction} must be in [0, 1 - text_fraction = "
                             f"{1.0 - text_fraction:g}]")
        room = 1.0 - text_fraction - recall_fraction
        if not 0.0 <= composed_fraction <= room + 1e-9:
            raise ValueError(f"composed_fraction={composed_fraction} must be in [0, 1 - text_fraction - "
                             f"recall_fraction = {max(0.0, room):g}]")
        if not 0.0 <= kinds_fraction <= 1.0:
            raise ValueError(f"kinds_fraction={kinds_fraction} must be in [0, 1]")
        if not 1 <= max_needles <= len(ACCOUNTS):  # retrieval_examples' bound, checked here before any row is drawn
            raise ValueError(f"max_needles={max_needles} must be in [1, {len(ACCOUNTS)}]")
        if not 64 <= min_tokens <= max_tokens - 8:
            raise ValueError(f"min_tokens={min_tokens} must be in [64, max_tokens - 8 = {max_tokens - 8}]")
        if recall_fraction > 0 and (window is None or not 16 <= window <= min_tokens - self.RECALL_MIN):
            raise ValueError(f"window={window}: recall rows need a window in [16, min_tokens - {self.RECALL_MIN} = "
                             f"{min_tokens - self.RECALL_MIN}] (one whole window of source plus its quotes)")
        self.tokenizer, self.documents = tokenizer, [d for d in documents if d.strip()]
        self.min_tokens, self.max_tokens, self.seed = min_tokens, max_tokens, seed
        self.text_fraction, self.templates, self.max_needles = text_fraction, templates, max_needles
        self.recall_fraction, self.window, self.composed_fraction = recall_fraction, window, composed_fraction
        self.block, self.start_block, self.kinds_fraction = block, start_block, kinds_fraction
        # the prose as one token stream (cycled), tokenized once for every block of rows
        self.stream = token_stream(tokenizer, self.documents, 1, min_tokens, max_tokens - 8)
        if recall_fraction > 0 or composed_fraction > 0:
            self.boundaries = boundary_ids(tokenizer)
        if recall_fraction > 0:
            self.newline = tokenizer.encode("\n", add_special_tokens=False)
            self.separator = tokenizer.encode("\n\n", add_special_tokens=False)  # between the source and the quotes

    def _text_row(self, rng: random.Random) -> dict:
        length, start = rng.randint(self.min_tokens, self.max_tokens), rng.randrange(len(self.stream))
        ids = [self.stream[(start + i) % len(self.stream)] for i in range(length)]
        return {"input_ids": ids, "text_labels": list(ids), "answer_labels": [IGNORE_INDEX] * length}

    def _recall_row(self, rng: random.Random) -> dict:
        """Source (whole windows of prose with 1..2*max_needles needles at sentence starts), then quotes until the
        row is full: every needle's cue once, the rest random sentence starts of the source; order shuffled."""
        encode = partial(self.tokenizer.encode, add_special_tokens=False)
        length = rng.randint(self.min_tokens, self.max_tokens)
        n_src = self.window * max(1, (length - self.RECALL_MIN) // self.window)
        facts = [self._recall_fact(rng) for _ in range(rng.randint(1, 2 * self.max_needles))]
        needles = [(encode(" " + cue), encode(" " + rest)) for cue, rest in facts]  # (cue ids, rest ids)
        start = rng.randrange(len(self.stream))  # n_src tokens of filler: more than the needles leave room for
        filler = [self.stream[(start + i) % len(self.stream)] for i in range(n_src)]
        room = max(2, n_src - sum(len(c) + len(r) for c, r in needles))  # needles start before it, so all fit
        cuts = [i for i in range(1, room) if filler[i - 1] in self.boundaries] or list(range(1, room))
        points = sorted(rng.choice(cuts) for _ in needles)
        source, quotes, prev = [], [], 0
        for point, (cue, rest) in zip(points, needles):
            source += filler[prev:point]
            if len(source) + len(cue) + len(rest) <= n_src:  # a needle the trim below would cut is left out
                quotes.append((cue, rest))
                source += cue + rest
            prev = point
        source = (source + filler[prev:])[:n_src]
        starts = [i + 1 for i, t in enumerate(source[:-32]) if t in self.boundaries] or [0]
        ids = source + self.separator
        answers = [IGNORE_INDEX] * len(ids)
        rng.shuffle(quotes)
        while True:
            if not quotes:  # a sentence start of the source: a cue of 4-8 tokens and the next 8-24
                at, n_cue, n_rest = rng.choice(starts), rng.randint(4, 8), rng.randint(8, 24)
                quotes.append((source[at : at + n_cue], source[at + n_cue : at + n_cue + n_rest]))
            cue, rest = quotes.pop()
            quote = self.newline + cue + rest
            if len(ids) + len(quote) > length:
                break
            ids += quote
            answers += [IGNORE_INDEX] * (len(self.newline) + len(cue)) + rest
        return {"input_ids": ids, "text_labels": source + [IGNORE_INDEX] * (len(ids) - n_src),
                "answer_labels": answers}

    def _recall_fact(self, rng: random.Random) -> tuple[str, str]:
        """A needle for a recall row as ``(cue, rest)``: a template fact, or (half the time when composed rows are
        on) a composed one from the training split."""
        if self.kinds_fraction > 0 and rng.random() < self.kinds_fraction:
            fact = check_training_fact(eval_facts.eval_fact(rng, rng.choice(eval_facts.KINDS), "train"))
            if fact.cue:  # a statement that opens with its value has no cue to quote
                return fact.cue, fact.rest
        if self.composed_fraction > 0 and rng.random() < 0.5:
            fact = compose_fact(rng, "train")
            return fact.cue, fact.rest
        return draw_fact(rng, self.templates)

    def _with_kinds(self, rng: random.Random, facts: list[Fact]) -> list[Fact]:
        """``facts`` with each replaced, at rate ``kinds_fraction``, by a fact of the retrieval evaluation's training
        phrasings (`eval_facts.eval_fact`, a random kind) about a thing and with a value no other fact has."""
        if self.kinds_fraction <= 0:
            return facts
        out = list(facts)
        for i in range(len(out)):
            if rng.random() < self.kinds_fraction:
                taken = {f.holder for f in out} | {f.value for f in out}
                for _ in range(8):  # a clash is rare: redraw it
                    fact = check_training_fact(eval_facts.eval_fact(rng, rng.choice(eval_facts.KINDS), "train"))
                    if fact.holder not in taken and fact.value not in taken:
                        out[i] = fact
                        break
        return out

    def _composed_row(self, rng: random.Random) -> dict:
        """Intro, prose with 1..max_needles composed facts (distinct holders) at sentence starts, then every fact
        asked in random order: ``"\n\n" + question + " " + lead-in`` and the answer ``" " + value + "."``. The
        queried facts sit mostly (five times in six) in the first five sixths of the prose, so in compressed
        windows. Labels: the intro and prose in ``text_labels``, the answers in ``answer_labels``, questions in
        neither (nothing before them predicts their wording)."""
        encode = partial(self.tokenizer.encode, add_special_tokens=False)
        length = rng.randint(self.min_tokens, self.max_tokens)
        facts = self._with_kinds(rng, compose_facts(rng, rng.randint(1, self.max_needles), "train"))
        intro = encode(rng.choice(INTROS))

        def sizes(kept):
            needles = [encode(f.inserted) for f in kept]
            asks = [(encode(f.asked), encode(f.completion)) for f in kept]
            return needles, asks, length - len(intro) - sum(map(len, needles)) - sum(len(q) + len(a) for q, a in asks)

        needles, asks, n_fill = sizes(facts)
        while n_fill < 32 and len(facts) > 1:  # a short row keeps fewer facts
            facts = facts[:-1]
            needles, asks, n_fill = sizes(facts)
        n_fill = max(16, n_fill)
        start = rng.randrange(len(self.stream))
        filler = [self.stream[(start + i) % len(self.stream)] for i in range(n_fill)]
        cuts = [i for i in range(1, n_fill) if filler[i - 1] in self.boundaries] or list(range(1, n_fill))
        early = [c for c in cuts if c <= 5 * n_fill // 6] or cuts
        points = sorted(rng.choice(early if rng.random() < 5 / 6 else cuts) for _ in needles)
        ids, prev = list(intro), 0
        for point, needle in zip(points, needles):
            ids += filler[prev:point] + needle
            prev = point
        ids += filler[prev:]
        text = list(ids)
        answers = [IGNORE_INDEX] * len(ids)
        rng.shuffle(asks)
        for question, answer in asks:
            ids += question + answer
            answers += [IGNORE_INDEX] * len(question) + answer
        ids, answers = ids[: self.max_tokens], answers[: self.max_tokens]
        text = (text + [IGNORE_INDEX] * len(ids))[: len(ids)]
        return {"input_ids": ids, "text_labels": text, "answer_labels": answers}

    def _retrieval_rows(self, n: int, seed: int) -> list[dict]:
        rows = []
        for ex in retrieval_examples(self.tokenizer, self.documents, n, self.min_tokens, self.max_tokens, seed=seed,
                                     max_needles=self.max_needles, ask_all=True, templates=self.templates,
                                     as_ids=True, stream=self.stream):
            prompt, answer = ex["prompt_ids"], ex["completion_ids"]
            ids = (prompt + answer)[: self.max_tokens]
            n_prompt = min(len(prompt), len(ids))
            text = prompt[:n_prompt] + [IGNORE_INDEX] * (len(ids) - n_prompt)
            answers = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
            rows.append({"input_ids": ids, "text_labels": text, "answer_labels": answers})
        return rows

    def blocks(self, worker: int = 0, workers: int = 1) -> Iterator[list[dict]]:
        number = self.start_block + worker
        while True:
            rng = random.Random(f"{self.seed}:{number}")
            draws = [rng.random() for _ in range(self.block)]
            n_text = sum(d < self.text_fraction for d in draws)
            recall_end = self.text_fraction + self.recall_fraction
            n_recall = sum(self.text_fraction <= d < recall_end for d in draws)
            n_composed = sum(recall_end <= d < recall_end + self.composed_fraction for d in draws)
            rows = [self._text_row(rng) for _ in range(n_text)] + [self._recall_row(rng) for _ in range(n_recall)]
            rows += [self._composed_row(rng) for _ in range(n_composed)]
            if n_text + n_recall + n_composed < self.block:
                rows += self._retrieval_rows(self.block - n_text - n_recall - n_composed, rng.randrange(2**31))
            rng.shuffle(rows)
            yield rows
            number += workers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for rows in self.blocks(worker, workers):
            yield from rows


def collate_rows(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of `MixedRows` into ``input_ids``, ``attention_mask``, ``text_labels``, ``answer_labels``
    (each (B, T))."""
    longest = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), longest), pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
           "text_labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
           "answer_labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.as_tensor(r["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["text_labels"][i, :n] = torch.as_tensor(r["text_labels"])
        out["answer_labels"][i, :n] = torch.as_tensor(r["answer_labels"])
    return out
