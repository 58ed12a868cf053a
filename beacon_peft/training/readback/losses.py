"""The read-back stage's loss terms: self-distillation from full attention and the chunked head losses.

* **Self-distillation from full attention**: the frozen base with the adapter disabled reads the same row
  uncompressed (within its native positions); the KL divergence of the compressed model's next-token distribution
  from the base model's, on every raw token, tells the beacons what the memory should have carried, densely, keys
  included. No second model is held: the teacher is the base under ``disable_adapter()``. `head_losses` computes
  it with the two cross-entropies (prose, answers) from the *last hidden states* through the output head, chunk by
  chunk (`decoder_and_head` finds and checks the decoder and head), and `hidden_distance` is the optional
  layer-wise term. (The same sums over full logits, ``masked_ce`` and ``kl_to_teacher``, are the tests' references:
  tests/readback_reference.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...labels import IGNORE_INDEX


def hidden_distance(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the layer-wise hidden-state distance to the full-attention teacher over the positions
    where ``mask`` is true: for each position, the mean over layers of ``|h_s - h_t|^2 / |h_t|^2``.

    student, teacher: ``output_hidden_states`` tuples (embeddings, then every layer), each (B, T, H); mask (B, T)
    bool. The embeddings (identical by construction) are skipped. Each position is measured relative to the
    teacher's own norm there, so a few tokens with massive activations do not outweigh the rest. Computed in
    float32; the gradient reaches ``student`` only. This is the dense "what the memory should carry" signal of
    self-distillation: every layer of every raw token after compressed windows is told what full attention made.
    """
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"student has {len(student)} hidden-state tensors and teacher {len(teacher)}: both must be "
                         "output_hidden_states tuples of the same model (embeddings + at least one layer)")
    index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions
    total = student[0].new_zeros((), dtype=torch.float32)
    for s_layer, t_layer in zip(student[1:], teacher[1:]):
        if s_layer.shape != t_layer.shape:
            raise ValueError(f"student hidden states {tuple(s_layer.shape)} and teacher's {tuple(t_layer.shape)} "
                             "differ")
        s = s_layer.reshape(-1, s_layer.shape[-1]).index_select(0, index).float()  # (N, H)
        t = t_layer.reshape(-1, t_layer.shape[-1]).index_select(0, index).float().detach()
        total = total + ((s - t).square().sum(-1) / (t.square().sum(-1) + eps)).sum()
    count = torch.tensor(float(index.numel()), device=student[0].device)
    return total / (len(student) - 1), count


HEAD_TERMS = ("text", "answer", "kl")  # the terms `head_losses` returns, in order


def _head_chunk(head: torch.nn.Module, temperature: float, hidden: torch.Tensor, teacher: torch.Tensor | None,
                text_next: torch.Tensor, answer_next: torch.Tensor, kl_rows: torch.Tensor) -> torch.Tensor:
    """The sums of `HEAD_TERMS` over one chunk of n flat positions: hidden / teacher (n, H), the next-token
    labels (n,), kl_rows (n,) bool. Returns (3,) float32. One log-softmax of the student serves both
    cross-entropies and (at temperature 1) the KL term."""
    logits = head(hidden).float()  # (n, V)
    logp = F.log_softmax(logits, dim=-1)

    def nll(labels: torch.Tensor) -> torch.Tensor:  # summed over the labelled rows
        keep = labels != IGNORE_INDEX
        picked = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)  # (n,)
        return -(picked * keep).sum()

    kl = logp.new_zeros(())
    rows = kl_rows.nonzero().squeeze(1)
    if teacher is not None and rows.numel():
        with torch.no_grad():
            t = F.log_softmax(head(teacher.index_select(0, rows)).float() / temperature, dim=-1)  # (m, V)
        s = logp.index_select(0, rows) if temperature == 1.0 else \
            F.log_softmax(logits.index_select(0, rows) / temperature, dim=-1)
        kl = (t.exp() * (t - s)).sum() * temperature**2
    return torch.stack([nll(text_next), nll(answer_next), kl])


def head_losses(hidden: torch.Tensor, teacher: torch.Tensor | None, head: torch.nn.Module,
                text_labels: torch.Tensor, answer_labels: torch.Tensor, mask: torch.Tensor,
                temperature: float = 1.0, chunk: int | None = 1024) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{term: (sum, count)}`` for the text and answer cross-entropies and KL(teacher || student) (0 when
    ``teacher`` is None; the same sums as ``masked_ce`` and ``kl_to_teacher`` of tests/readback_reference.py over
    full logits) computed from the *last hidden states* through the
    output ``head``, ``chunk`` positions at a time, each chunk checkpointed: the vocabulary-sized logits of the
    student and the teacher exist for one chunk only, in the forward and again in the backward, never for the
    whole row. That is what lets a 24 GiB machine train on 8K-token rows (49,152-word vocabulary: 1.6 GB of float32
    logits per copy at 8K). The price is one more pass of the head over every position in the backward. ``chunk``
    None: all positions at once, nothing recomputed (the full logits are held, as from the model's own forward).

    hidden (B, T, H) the compressed model's last hidden states (after the final norm); teacher (B, T, H) the
    full-attention base's, or None; text_labels / answer_labels (B, T) with `IGNORE_INDEX` where nothing is
    scored (position t predicts label t + 1); mask (B, T) bool, the positions the KL is taken over. The gradient
    reaches ``hidden`` only.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}: allowed an int >= 1, or None (all positions at once)")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if teacher is not None and teacher.shape != hidden.shape:
        raise ValueError(f"student hidden states {tuple(hidden.shape)} and teacher's {tuple(teacher.shape)} differ")
    batch, length, width = hidden.shape
    end = text_labels.new_full((batch, 1), IGNORE_INDEX)
    text_next = torch.cat([text_labels[:, 1:], end], 1).reshape(-1)  # (B*T,) the label each position predicts
    answer_next = torch.cat([answer_labels[:, 1:], end], 1).reshape(-1)
    kl_rows = mask.reshape(-1).bool()
    flat = hidden.reshape(-1, width)  # (B*T, H)
    flat_teacher = None if teacher is None else teacher.reshape(-1, width).detach()
    if chunk is None:
        sums = _head_chunk(head, temperature, flat, flat_teacher, text_next, answer_next, kl_rows)
    else:
        sums = hidden.new_zeros(3, dtype=torch.float32)
        for start in range(0, flat.shape[0], chunk):
            part = slice(start, start + chunk)
            sums = sums + checkpoint(_head_chunk, head, temperature, flat[part],
                                     None if flat_teacher is None else flat_teacher[part], text_next[part],
                                     answer_next[part], kl_rows[part], use_reentrant=False)
    counts = [(text_next != IGNORE_INDEX).sum(), (answer_next != IGNORE_INDEX).sum(),
              kl_rows.sum() if teacher is not None else kl_rows.new_zeros(())]
    return {name: (sums[i], counts[i].float()) for i, name in enumerate(HEAD_TERMS)}


def decoder_and_head(model, sample: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder (whose forward the beacon adapter replaces) and the output head of a PEFT beacon model, for
    `head_losses`. Checked first on ``sample`` (1, n) token ids, with the adapter disabled and in eval mode: the
    causal LM's logits must be ``head(decoder(ids).last_hidden_state)``, else (a logit scale or soft-cap the
    chunked losses would miss) a ValueError, so a model or library change cannot alter the losses silently."""
    from ...support import decoder_of

    lm = model.get_base_model()
    decoder, head = decoder_of(lm), lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            want = model(input_ids=sample).logits.float()  # (1, n, V)
            got = head(decoder(input_ids=sample).last_hidden_state).float()
    finally:
        model.train(was_training)
    gap = float((want - got).abs().max())
    if want.shape != got.shape or gap > 1e-3 * max(1.0, float(want.abs().max())):
        raise ValueError(f"{type(lm).__name__}'s logits are not its output head applied to the decoder's last hidden "
                         f"state (largest difference {gap:.3g}): head_losses would compute different losses")
    return decoder, head
