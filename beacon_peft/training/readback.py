"""Teaching beacons to read facts back from compressed memory: mixed rows and self-distillation.

The plain-text stage (next-token loss over prose) teaches the beacons the gist of a window; a fact's exact
tokens (a pass key's digits) carry little weight in that loss and are not kept. This module gives the two
signals that make the memory keep them (docs/training.md, "Read-back stage"):

* **Mixed rows** (`MixedRows`): an endless, seeded stream of training rows, each either plain training text
  (loss on every token) or a synthetic retrieval row (`synthetic.retrieval_examples`: needles at random depths
  in real prose, every needle asked after the haystack) whose answers are weighted apart from the prose, so the
  answers are not drowned by thousands of text tokens.
* **Self-distillation from full attention** (`kl_to_teacher`): the frozen base with the adapter disabled reads
  the same row uncompressed (within its native positions); the KL divergence of the compressed model's next-token
  distribution from the base model's, on every raw token, tells the beacons what the memory should have carried,
  densely, keys included. No second model is held: the teacher is the base under ``disable_adapter()``.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX
from .synthetic import _token_stream, retrieval_examples


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of KL(teacher || student) over the positions where ``mask`` is true, in nats.

    student, teacher: logits (B, T, V); mask: (B, T) bool. Computed in float32 over chunks of ``chunk`` positions
    so the full-vocabulary softmaxes never exist for the whole batch at once. The gradient reaches ``student``
    only. ``temperature`` softens both distributions (the sum is scaled by ``temperature**2`` as usual).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions
    s_flat = student.reshape(-1, student.shape[-1])  # (B*T, V)
    t_flat = teacher.reshape(-1, teacher.shape[-1])
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, index.numel(), chunk):
        rows = index[start : start + chunk]
        s = F.log_softmax(s_flat.index_select(0, rows).float() / temperature, dim=-1)  # (n, V)
        t = F.log_softmax(t_flat.index_select(0, rows).float().detach() / temperature, dim=-1)
        total = total + (t.exp() * (t - s)).sum()
    return total * temperature**2, torch.tensor(float(index.numel()), device=student.device)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of next-token cross-entropy: position ``t`` predicts ``labels[:, t + 1]``.

    logits (B, T, V), labels (B, T) with `IGNORE_INDEX` where nothing is scored.
    """
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32), torch.tensor(0.0, device=logits.device)
    picked = logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, keep).float()  # (n, V)
    loss = F.cross_entropy(picked, targets.index_select(0, keep), reduction="sum")
    return loss, torch.tensor(float(keep.numel()), device=logits.device)


class MixedRows(torch.utils.data.IterableDataset):
    """Endless rows ``{"input_ids", "text_labels", "answer_labels"}`` (lists of equal length, at most
    ``max_tokens``): a share ``text_fraction`` of plain text, the rest retrieval rows.

    ``text_labels`` scores the prose (every token of a plain row; the haystack of a retrieval row),
    ``answer_labels`` the answers of a retrieval row (`IGNORE_INDEX` elsewhere). Rows are drawn in blocks of
    ``block`` from a seed that depends on ``seed``, the block number and the DataLoader worker, so a run is
    reproducible and a resumed run (``start_block``) draws new rows.
    """

    def __init__(self, tokenizer, documents: Sequence[str], min_tokens: int, max_tokens: int, seed: int = 0,
                 text_fraction: float = 0.3, templates: Sequence[int] | None = None, max_needles: int = 4,
                 block: int = 32, start_block: int = 0):
        super().__init__()
        if not 0.0 <= text_fraction <= 1.0:
            raise ValueError(f"text_fraction={text_fraction} must be in [0, 1]")
        if not 64 <= min_tokens <= max_tokens - 8:
            raise ValueError(f"min_tokens={min_tokens} must be in [64, max_tokens - 8 = {max_tokens - 8}]")
        self.tokenizer, self.documents = tokenizer, [d for d in documents if d.strip()]
        self.min_tokens, self.max_tokens, self.seed = min_tokens, max_tokens, seed
        self.text_fraction, self.templates, self.max_needles = text_fraction, templates, max_needles
        self.block, self.start_block = block, start_block
        # the prose as one token stream (cycled), tokenized once for every block of rows
        self.stream = _token_stream(tokenizer, self.documents, 1, min_tokens, max_tokens - 8)

    def _text_row(self, rng: random.Random) -> dict:
        length, start = rng.randint(self.min_tokens, self.max_tokens), rng.randrange(len(self.stream))
        ids = [self.stream[(start + i) % len(self.stream)] for i in range(length)]
        return {"input_ids": ids, "text_labels": list(ids), "answer_labels": [IGNORE_INDEX] * length}

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
            n_text = sum(rng.random() < self.text_fraction for _ in range(self.block))
            rows = [self._text_row(rng) for _ in range(n_text)]
            if n_text < self.block:
                rows += self._retrieval_rows(self.block - n_text, rng.randrange(2**31))
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
