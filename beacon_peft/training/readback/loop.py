"""The read-back stage's training loop (`train`): a plain PyTorch loop (no TRL) over `MixedRows` with the loss

    loss = CE(prose) + answer_weight * CE(answers) + kl_weight * KL(full-attention base || compressed model)
           + hidden_weight * D(hidden states of every layer, compressed model vs full-attention base)

(answers: retrieval rows' answers and recall rows' quotes), where the teacher is the frozen base with the adapter
disabled (no second model in memory). Every ``eval_every`` steps it measures the curve's point (`probes.probe_point`)
and every ``save_minutes`` it writes a resumable checkpoint (`checkpoint.save_checkpoint`).

Outputs under ``output_dir``: ``checkpoint/`` (resume: ``state.pt``; ``adapter/``, the checkpoint's adapter as a
loadable folder), ``final/`` (the adapter: PEFT folder, loadable with ``PeftModel.from_pretrained``), ``curve.json``
(step, tokens, loss terms, key information), ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import random
import time
from functools import partial
from pathlib import Path

import torch

from ...atomic import refuse_earlier_run
from .arguments import ReadbackArguments
from .checkpoint import load_checkpoint, save_checkpoint, write_final_adapter
from .losses import HEAD_TERMS, decoder_and_head, head_losses, hidden_distance
from .modeling import load
from .probes import held_out_haystack, make_probe, make_text_probe, probe_point
from .rows import MixedRows, collate_rows, training_documents

TERMS = ("text", "answer", "kl", "hidden")  # the loss terms `train_log.jsonl` records (means over logged steps)


def train(args: ReadbackArguments) -> Path:
    """Train (or, with ``args.resume``, continue from ``output_dir/checkpoint``) until ``max_steps`` or
    ``max_minutes``; returns the final adapter folder, ``output_dir/final``."""
    out = args.output_dir
    earlier = [name for name in ("checkpoint", "final", "curve.json", "train_log.jsonl") if (out / name).exists()]
    if not args.resume and not args.overwrite_output_dir:
        refuse_earlier_run(out, earlier, "--resume", "--overwrite_output_dir")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    if earlier and not args.resume:  # --overwrite_output_dir: the new run's log starts empty (a resume appends)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    device = torch.device(args.device)
    model, tokenizer = load(args)
    params = [p for p in model.parameters() if p.requires_grad]
    decoder, head = decoder_and_head(model, torch.tensor([tokenizer.encode("A short check of the output head.")],
                                                         device=device))
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, tokens = 0, 0
    resumed = load_checkpoint(model, optimizer, out, device, bool(args.base_lora_r)) if args.resume else None
    if resumed is not None:
        step, tokens = resumed
        print(f"resumed from step {step} ({tokens} tokens)", flush=True)
    loader = _loader(args, tokenizer, step)
    point = _curve_point(args, model, tokenizer, device)  # point(step, tokens): one point of the curve
    curve_path = out / "curve.json"
    curve = _start_curve(curve_path, args.resume, point, step, tokens)
    model.train()
    start, last_save, log = time.time(), time.time(), _LossLog(out / "train_log.jsonl")
    for batch in loader:
        if step >= args.max_steps or (time.time() - start) / 60 >= args.max_minutes:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        loss, terms = step_loss(args, model, decoder, head, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        n_tok = int(batch["attention_mask"].sum())
        tokens += n_tok
        log.add(terms, n_tok)
        if step % args.log_every == 0:
            log.write(step, tokens, start)
        if step % args.eval_every == 0:
            _add_point(curve, curve_path, point, step, tokens)
        if (time.time() - last_save) / 60 >= args.save_minutes:
            save_checkpoint(model, optimizer, step, tokens, out, tokenizer, args)
            last_save = time.time()
    if curve[-1]["step"] != step:
        _add_point(curve, curve_path, point, step, tokens)
    save_checkpoint(model, optimizer, step, tokens, out, tokenizer, args)
    final = write_final_adapter(model, tokenizer, args, out, step, tokens)
    print(f"saved {final} after {step} steps, {tokens} tokens, {(time.time() - start) / 60:.1f} minutes", flush=True)
    return final


def step_loss(args: ReadbackArguments, model, decoder, head, batch: dict) -> tuple[torch.Tensor, dict]:
    """One batch's loss (to back-propagate) and its terms ``{text, answer, kl, hidden}`` (detached means; kl and
    hidden 0 when their weight is 0). The teacher is the decoder with the adapter disabled, without gradients."""
    device = batch["input_ids"].device
    teacher, teacher_hidden, layers = None, None, args.hidden_weight > 0
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=layers)
    if args.kl_weight > 0 or layers:
        with torch.no_grad(), model.disable_adapter():
            t_out = decoder(**inputs)  # the full-attention base: last hidden states (B, T, H), no logits
            teacher, teacher_hidden = t_out.last_hidden_state, t_out.hidden_states
            del t_out
    s_out = decoder(**inputs)  # the compressed model's last hidden states (B, T, H)
    terms_out = head_losses(s_out.last_hidden_state, teacher if args.kl_weight > 0 else None, head,
                            batch["text_labels"], batch["answer_labels"], batch["attention_mask"].bool(),
                            args.temperature, chunk=args.logit_chunk or None)
    (text_sum, text_n), (ans_sum, ans_n), (kl_sum, kl_n) = (terms_out[k] for k in HEAD_TERMS)
    loss = text_sum / text_n.clamp(min=1) + args.answer_weight * ans_sum / ans_n.clamp(min=1)
    kl, hid = torch.zeros((), device=device), torch.zeros((), device=device)
    if args.kl_weight > 0:
        kl = kl_sum / kl_n.clamp(min=1)
        loss = loss + args.kl_weight * kl
    if layers:
        hid_sum, hid_n = hidden_distance(s_out.hidden_states, teacher_hidden, batch["attention_mask"].bool())
        hid = hid_sum / hid_n.clamp(min=1)
        loss = loss + args.hidden_weight * hid
    terms = dict(text=text_sum.detach() / text_n.clamp(min=1), answer=ans_sum.detach() / ans_n.clamp(min=1),
                 kl=kl.detach(), hidden=hid.detach())
    return loss, terms


def _loader(args: ReadbackArguments, tokenizer, step: int) -> torch.utils.data.DataLoader:
    """The rows from the training texts (template phrasings ``held_out_templates`` never trained on); a resumed run
    (``step`` > 0) starts at new blocks of rows."""
    from ..synthetic import TEMPLATES

    train_templates = [t for t in range(len(TEMPLATES)) if t not in set(args.held_out_templates)]
    rows = MixedRows(tokenizer, training_documents(), args.min_tokens, args.max_tokens, seed=args.seed,
                     text_fraction=args.text_fraction, templates=train_templates,
                     recall_fraction=args.recall_fraction, window=args.window,
                     composed_fraction=args.composed_fraction, kinds_fraction=args.kinds_fraction,
                     start_block=step * args.batch_size // 32 + (1000 if step else 0))
    return torch.utils.data.DataLoader(rows, batch_size=args.batch_size, num_workers=args.workers,
                                       collate_fn=partial(collate_rows, pad_token_id=tokenizer.pad_token_id))


def _curve_point(args: ReadbackArguments, model, tokenizer, device):
    """``point(step, tokens)``: `probes.probe_point` on the run's fixed held-out probes (made once here)."""
    hay = held_out_haystack(tokenizer)
    probe = make_probe(tokenizer, hay, args.probe_cases, args.window)
    unseen = make_probe(tokenizer, hay, args.probe_cases, args.window, unseen=True) if args.composed_fraction else None
    texts = make_text_probe(hay, args.probe_cases // 2 or 1, length=4 * args.window)
    return partial(probe_point, model, probe, texts, device, unseen=unseen, ratio=args.probe_ratio)


def _start_curve(path: Path, resume: bool, point, step: int, tokens: int) -> list[dict]:
    """The curve so far: a resumed run's, without the points measured after its checkpoint; with the point of
    ``step`` measured unless it is there."""
    curve = json.loads(path.read_text()) if resume and path.is_file() else []
    lost = [c["step"] for c in curve if c["step"] > step]
    if lost:  # measured after the checkpoint, on weights the resumed run no longer has
        print(f"dropping curve points {lost}: they come after the checkpoint's step {step}", flush=True)
        curve = [c for c in curve if c["step"] <= step]
    if not curve or curve[-1]["step"] != step or "context_gain" not in curve[-1]:
        curve = [c for c in curve if c["step"] != step]
        _add_point(curve, path, point, step, tokens)
    return curve


def _add_point(curve: list[dict], path: Path, point, step: int, tokens: int) -> None:
    curve.append(point(step, tokens))
    path.write_text(json.dumps(curve, indent=1))


class _LossLog:
    """Means of the loss terms over the steps since the last record, and the token rate, into ``train_log.jsonl``
    (appended: a resumed run continues the file) and stdout."""

    def __init__(self, path: Path):
        self.path = path
        self._reset()

    def _reset(self) -> None:
        self.sums, self.n, self.tokens, self.since = dict.fromkeys(TERMS, 0.0), 0, 0, time.time()

    def add(self, terms: dict[str, torch.Tensor], n_tokens: int) -> None:
        for k in TERMS:
            self.sums[k] += float(terms[k])
        self.n += 1
        self.tokens += n_tokens

    def write(self, step: int, tokens: int, start: float) -> None:
        rate = self.tokens / (time.time() - self.since)
        record = dict(step=step, tokens=tokens, minutes=round((time.time() - start) / 60, 2), tokens_per_s=round(rate),
                      **{k: round(self.sums[k] / self.n, 4) for k in TERMS})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        self._reset()
