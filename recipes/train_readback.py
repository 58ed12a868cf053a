"""Read-back stage: teach a beacon adapter to answer from facts held only in compressed memory.

A plain PyTorch loop (no TRL) over `beacon_peft.training.readback`: mixed rows (plain text + synthetic retrieval
rows from the training texts, some needle phrasings held out) and a loss of three terms,

    loss = CE(prose) + answer_weight * CE(answers) + kl_weight * KL(full-attention base || compressed model)
           + hidden_weight * D(hidden states of every layer, compressed model vs full-attention base)

(answers: retrieval rows' answers and recall rows' quotes)

where the teacher is the frozen base with the adapter disabled (no second model in memory). Every
``--eval_every`` steps it measures *key information* on a fixed held-out probe (the NLL of a pass key's tokens
after a context holding another key, minus after its own; the needle inside a compressed window) and writes the
curve; every ``--save_minutes`` it writes a resumable checkpoint (adapter, optimizer, step) atomically.

    python recipes/train_readback.py --config recipes/configs/readback/smollm2-135m-gpu.yaml            # GPU
    python recipes/train_readback.py --config recipes/configs/readback/smollm2-135m-gpu.yaml --resume    # continue
    python recipes/train_readback.py --config recipes/configs/readback/smollm2-135m-gpu.yaml \\
        --device cpu --dtype float32 --max_tokens 1024 --min_tokens 600 --batch_size 1 --max_steps 2   # smoke

Outputs under ``--output_dir``: ``checkpoint/`` (resume: ``state.pt``; ``adapter/``, the checkpoint's adapter as a
loadable folder), ``final/`` (the adapter: PEFT folder, loadable with
``PeftModel.from_pretrained``), ``curve.json`` (step, tokens, loss terms, key information), ``train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from functools import partial
from pathlib import Path

import torch

from beacon_peft.atomic import write_dir
from beacon_peft.precision import DTYPE_NAMES, resolve_dtype


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="YAML file of defaults (command line wins)")
    p.add_argument("--model", default="offline:smollm2",
                   help="offline:smollm2 (the offline SmolLM2-135M) or a local model folder with its tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="base model dtype (adapter: fp32); auto: bfloat16 where it is the fast path "
                   "(beacon_peft.precision), else float32")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--sink_size", type=int, default=1)
    p.add_argument("--init_adapter", default=None,
                   help="start from this adapter folder (same settings; --beacon_projections may add projections it "
                   "lacks, which start as copies of the base's: the model computes what the folder's adapter did)")
    p.add_argument("--beacon_projections", nargs="+", default=["q", "k", "v"], choices=["q", "k", "v", "o"],
                   help="attention projections with a beacon copy (BeaconConfig.beacon_projections)")
    p.add_argument("--base_lora_r", type=int, default=0,
                   help="rank of a LoRA on the frozen base's own projections (the raw-token path, the readers of the "
                   "compressed memory), trained with the beacon adapter and saved beside it in base_lora/ "
                   "(beacon_peft.training.load_trained); 0 (default): beacon parameters only")
    p.add_argument("--base_lora_alpha", type=int, default=32)
    p.add_argument("--base_lora_targets", nargs="+", default=["q_proj", "v_proj"],
                   help="base projections the LoRA adapts (module names inside each attention block)")
    p.add_argument("--min_tokens", type=int, default=2048)
    p.add_argument("--max_tokens", type=int, default=8192)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--text_fraction", type=float, default=0.3)
    p.add_argument("--recall_fraction", type=float, default=0.0,
                   help="share of recall rows: whole windows of source, then quotes read back from its compressed "
                   "memory (beacon_peft.training.readback.MixedRows); text_fraction + recall_fraction <= 1")
    p.add_argument("--composed_fraction", type=float, default=0.0,
                   help="share of composed retrieval rows: facts composed from holder/attribute/statement/question "
                   "parts of the training split (beacon_peft.training.phrasings); with it on, half the recall rows' "
                   "needles are composed too; text + recall + composed fractions <= 1")
    p.add_argument("--held_out_templates", type=int, nargs="*", default=[2, 6, 8],
                   help="synthetic.TEMPLATES indices never trained on (scored as unseen phrasings)")
    p.add_argument("--answer_weight", type=float, default=1.0)
    p.add_argument("--kl_weight", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hidden_weight", type=float, default=0.0,
                   help="weight of the layer-wise hidden-state distance to the full-attention base on every raw "
                   "token (beacon_peft.training.readback.hidden_distance); 0: off")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--max_steps", type=int, default=100000)
    p.add_argument("--max_minutes", type=float, default=60.0)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--probe_cases", type=int, default=12)
    p.add_argument("--probe_ratio", type=int, default=8,
                   help="compression ratio of the curve's probes (key information, context gain)")
    p.add_argument("--save_minutes", type=float, default=5.0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/readback"))
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--logit_chunk", type=int, default=0,
                   help="positions whose vocabulary-sized logits exist at once in the losses, each chunk recomputed "
                   "in the backward (beacon_peft.training.readback.head_losses), e.g. 1024 for 8K-token rows on "
                   "24 GiB; 0 (default): all at once, nothing recomputed (faster where the full logits fit)")
    first, _ = p.parse_known_args(argv)
    if first.config is not None:
        import yaml

        defaults = yaml.safe_load(first.config.read_text()) or {}
        unknown = sorted(set(defaults) - {a.dest for a in p._actions})
        if unknown:
            raise ValueError(f"{first.config}: unknown keys {unknown}")
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.max_tokens > 8192:
        raise ValueError(f"max_tokens={args.max_tokens}: the full-attention teacher reads at most the base model's "
                         "8192 positions: allowed <= 8192")
    if not 64 <= args.min_tokens <= args.max_tokens - 8:
        raise ValueError(f"min_tokens={args.min_tokens}: allowed [64, max_tokens - 8 = {args.max_tokens - 8}]")
    if args.probe_ratio not in args.ratios:
        raise ValueError(f"probe_ratio={args.probe_ratio}: the probes run at a ratio the adapter trains: allowed "
                         f"one of ratios {args.ratios}")
    if args.base_lora_r < 0 or args.base_lora_alpha <= 0:
        raise ValueError(f"base_lora_r={args.base_lora_r}, base_lora_alpha={args.base_lora_alpha}: allowed "
                         "base_lora_r >= 0 (0: no LoRA) and base_lora_alpha > 0")
    if args.logit_chunk < 0:
        raise ValueError(f"logit_chunk={args.logit_chunk}: allowed >= 0 (0: all positions at once)")
    for name in ("answer_weight", "kl_weight", "hidden_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name}={getattr(args, name)}: a loss weight: allowed >= 0")
    if args.device not in ("cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise ValueError(f"device={args.device!r}: allowed 'cpu', 'cuda' or 'cuda:N'")
    return args


def load(args):
    """Base (frozen) + beacon adapter on the device; trainable parameters in float32."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    import beacon_peft
    from beacon_peft.offline.weights import load_smollm2

    if args.model == "offline:smollm2":
        base, tokenizer = load_smollm2(dtype=resolve_dtype(args.dtype, args.device))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype, args.device))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base.to(args.device)
    if args.base_lora_r:  # before the beacon wrapper: raw tokens go through base + LoRA, beacons through their own
        from peft import inject_adapter_in_model

        from beacon_peft.training.modeling import LORA_DIR

        base = inject_adapter_in_model(base_lora_config(args), base, adapter_name=LORA_DIR)
    config = beacon_peft.BeaconConfig(window=args.window, ratios=list(args.ratios), ratio_mix="step-random",
                                      sink_size=args.sink_size, beacon_projections=list(args.beacon_projections))
    model = get_peft_model(base, config)
    if args.init_adapter:
        saved = load_file(str(Path(args.init_adapter) / "adapter_model.safetensors"))
        check_init_keys(set(get_peft_model_state_dict(model)), set(saved), args.init_adapter)
        set_peft_model_state_dict(model, saved)
    load_init_lora(model, args)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def base_lora_config(args, base_name: str | None = None):
    """The base LoRA's PEFT config (no dropout: the curve and the resume test compare exact numbers)."""
    from peft import LoraConfig

    return LoraConfig(r=args.base_lora_r, lora_alpha=args.base_lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(args.base_lora_targets), task_type="CAUSAL_LM",
                      base_model_name_or_path=base_name)


def load_init_lora(model, args) -> None:
    """Make the base LoRA (if any) trainable again after ``get_peft_model`` froze it, and fill it from
    ``--init_adapter``'s ``base_lora/`` when that folder has one (a LoRA starts at zero otherwise: B = 0, so the
    model computes what the beacon adapter alone did). A folder with a base LoRA and a run without one is a
    ValueError: the run would silently drop half of what the folder's model computes."""
    from beacon_peft.training.modeling import LORA_DIR, load_lora_state_dict, lora_layers

    folder = Path(args.init_adapter) / LORA_DIR if args.init_adapter else None
    if folder is not None and folder.is_dir() and not args.base_lora_r:
        raise ValueError(f"init_adapter={args.init_adapter} holds a base LoRA ({folder}): allowed only with "
                         "--base_lora_r > 0 and the same LoRA settings")
    for _, layer in lora_layers(model):
        layer.set_adapter(LORA_DIR)  # requires_grad on its parameters again
    if folder is not None and folder.is_dir():
        from safetensors.torch import load_file

        load_lora_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))


def check_init_keys(expected: set[str], given: set[str], folder) -> None:
    """The ``--init_adapter`` folder must fill every adapter weight of the model, except the beacon copies of
    projections the folder's adapter did not have (``beacon_o`` when q/k/v grow to q/k/v/o), which keep their
    initialisation as copies of the base projection, so the model starts computing exactly what the folder's adapter
    did. Anything else missing, or a weight the model lacks, is a ValueError (a silent partial load would train
    from a different start than the one recorded)."""
    unknown = sorted(given - expected)
    if unknown:
        raise ValueError(f"init_adapter={folder}: {len(unknown)} weights this model's adapter lacks, e.g. "
                         f"{unknown[:3]} (other settings: window, sink, projections, base model?)")

    def projection(name: str) -> str | None:  # "q" for ...self_attn.beacon_q.weight, None for anything else
        found = re.search(r"\.beacon_([qkvo])\.", name)
        return found.group(1) if found else None

    present = {projection(name) for name in given} - {None}
    unfilled = [name for name in sorted(expected - given) if projection(name) in present | {None}]
    if unfilled:
        raise ValueError(f"init_adapter={folder}: {len(unfilled)} weights missing, e.g. {unfilled[:3]}: allowed "
                         "missing only the copies of projections the folder's adapter did not have")


def training_documents() -> list[str]:
    from beacon_peft.offline.corpora import essay_split, extra_corpora

    train, _ = essay_split()  # the held-out essays are never read here
    return [text for _, text in train] + [text for _, text in extra_corpora()]


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


@torch.no_grad()
def key_readback(model, probe: list[dict], device, ratio: int = 8) -> dict[str, float]:
    """What the memory gives back of each probe key, at compression ``ratio``:

    - ``information``: mean NLL(key | other context) - NLL(key | own context), nats per key token
      (`beacon_peft.metrics.key_information`);
    - ``token_accuracy``: share of key tokens that are the argmax after their own context and the key's earlier
      tokens (teacher forcing);
    - ``exact``: share of keys whose every token is that argmax, i.e. the keys greedy decoding writes exactly.
    """
    from beacon_peft.metrics import key_information

    model.eval()
    model.base_model.set_compression_ratio(ratio)
    gaps, hits, exact, n_tokens = [], 0, 0, 0
    try:
        for case in probe:
            key = key_information(model, case["own"], case["other"], case["answer"], device)
            target = torch.tensor(case["answer"], device=key.own_logits.device)
            right = key.own_logits.argmax(-1) == target  # (answer tokens,)
            hits, exact, n_tokens = hits + int(right.sum()), exact + int(right.all()), n_tokens + len(right)
            gaps.append(key.information)
    finally:
        model.base_model.set_compression_ratio(None)
        model.train()
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

    model.eval()
    model.base_model.set_compression_ratio(ratio)
    gains = []
    try:
        for ids in stretches:
            gains.append(gain_of(model, ids, tail, device).gain)
    finally:
        model.base_model.set_compression_ratio(None)
        model.train()
    return sum(gains) / max(1, len(gains))


def evaluate(model, probe: list[dict], texts: list[list[int]], device, step: int, tokens: int,
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


def _write_adapter(model, tokenizer, args, folder: Path, step: int, tokens: int) -> None:
    """The adapter (a PEFT folder), its tokenizer and ``readback_args.json`` (the run's arguments, with the
    ``step`` and ``tokens`` it reached) into ``folder``."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if args.base_lora_r:  # a standard PEFT LoRA folder of the base, where `load_trained` looks for it
        from beacon_peft.training.modeling import LORA_DIR, write_lora

        base_name = model.peft_config["default"].base_model_name_or_path
        write_lora(model, folder / LORA_DIR, base_lora_config(args, base_name))
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (folder / "readback_args.json").write_text(json.dumps(record | {"step": step, "tokens": tokens}, indent=1))


def save_checkpoint(model, optimizer, step: int, tokens: int, out: Path, tokenizer=None, args=None) -> None:
    """Adapter + optimizer + counters into ``out/checkpoint/state.pt``, replacing the previous checkpoint
    atomically (`beacon_peft.atomic.write_dir`). With ``tokenizer`` and ``args``, ``out/checkpoint/adapter`` is
    also the checkpoint's adapter as a loadable folder (like ``final/``), so a run killed between checkpoints
    can be evaluated or exported (`recipes/export_readback.py RUN/checkpoint/adapter`) without resuming it."""
    from peft import get_peft_model_state_dict

    from beacon_peft.training.modeling import lora_state_dict

    state = {"adapter": get_peft_model_state_dict(model), "base_lora": lora_state_dict(model),
             "optimizer": optimizer.state_dict(), "step": step, "tokens": tokens, "rng": random.getstate(),
             "torch_rng": torch.get_rng_state()}

    def write(tmp: Path) -> None:
        torch.save(state, tmp / "state.pt")
        if tokenizer is not None and args is not None:
            (tmp / "adapter").mkdir()
            _write_adapter(model, tokenizer, args, tmp / "adapter", step, tokens)

    write_dir(out / "checkpoint", write, overwrite=True)


def save_final(model, tokenizer, args, out: Path, step: int, tokens: int) -> Path:
    """The adapter (a PEFT folder), its tokenizer and ``readback_args.json`` (the run's arguments, with the
    ``step`` and ``tokens`` it reached) into ``out/final``, replacing an earlier one atomically."""
    return write_dir(out / "final", lambda tmp: _write_adapter(model, tokenizer, args, tmp, step, tokens),
                     overwrite=True)


def main(argv=None) -> Path:
    from peft import set_peft_model_state_dict

    from beacon_peft.training.readback import (
        HEAD_TERMS,
        MixedRows,
        collate_rows,
        decoder_and_head,
        head_losses,
        hidden_distance,
    )

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    model, tokenizer = load(args)
    params = [p for p in model.parameters() if p.requires_grad]
    decoder, head = decoder_and_head(model, torch.tensor([tokenizer.encode("A short check of the output head.")],
                                                         device=device))
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, tokens = 0, 0
    if args.resume and (out / "checkpoint" / "state.pt").is_file():
        state = torch.load(out / "checkpoint" / "state.pt", map_location=device, weights_only=False)
        set_peft_model_state_dict(model, state["adapter"])
        if state.get("base_lora") or args.base_lora_r:  # a mismatch (LoRA in one, not the other) is a ValueError
            from beacon_peft.training.modeling import load_lora_state_dict

            load_lora_state_dict(model, state.get("base_lora", {}))
        optimizer.load_state_dict(state["optimizer"])
        step, tokens = state["step"], state["tokens"]
        random.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from step {step} ({tokens} tokens)", flush=True)
    from beacon_peft.training.synthetic import TEMPLATES

    train_templates = [t for t in range(len(TEMPLATES)) if t not in set(args.held_out_templates)]
    rows = MixedRows(tokenizer, training_documents(), args.min_tokens, args.max_tokens, seed=args.seed,
                     text_fraction=args.text_fraction, templates=train_templates,
                     recall_fraction=args.recall_fraction, window=args.window,
                     composed_fraction=args.composed_fraction,
                     start_block=step * args.batch_size // 32 + (1000 if step else 0))
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=partial(collate_rows, pad_token_id=tokenizer.pad_token_id))
    hay = held_out_haystack(tokenizer)
    probe = make_probe(tokenizer, hay, args.probe_cases, args.window)
    unseen = make_probe(tokenizer, hay, args.probe_cases, args.window, unseen=True) if args.composed_fraction else None
    texts = make_text_probe(hay, args.probe_cases // 2 or 1, length=4 * args.window)
    point = partial(evaluate, model, probe, texts, device, unseen=unseen, ratio=args.probe_ratio)  # (step, tokens)
    curve_path, log_path = out / "curve.json", out / "train_log.jsonl"
    curve = json.loads(curve_path.read_text()) if args.resume and curve_path.is_file() else []
    lost = [c["step"] for c in curve if c["step"] > step]
    if lost:  # measured after the checkpoint, on weights the resumed run no longer has
        print(f"dropping curve points {lost}: they come after the checkpoint's step {step}", flush=True)
        curve = [c for c in curve if c["step"] <= step]
    if not curve or curve[-1]["step"] != step or "context_gain" not in curve[-1]:
        curve = [c for c in curve if c["step"] != step] + [point(step, tokens)]
        curve_path.write_text(json.dumps(curve, indent=1))
    model.train()
    start, last_save, window_tokens, window_start = time.time(), time.time(), 0, time.time()
    terms = ("text", "answer", "kl", "hidden")
    sums = dict.fromkeys(terms, 0.0) | {"n": 0}
    for batch in loader:
        if step >= args.max_steps or (time.time() - start) / 60 >= args.max_minutes:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        teacher, teacher_hidden, layers = None, None, args.hidden_weight > 0
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=layers)
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
        del teacher, teacher_hidden, s_out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        n_tok = int(batch["attention_mask"].sum())
        tokens += n_tok
        window_tokens += n_tok
        sums["text"] += float(text_sum.detach() / text_n.clamp(min=1))
        sums["answer"] += float(ans_sum.detach() / ans_n.clamp(min=1))
        sums["kl"] += float(kl.detach())
        sums["hidden"] += float(hid.detach())
        sums["n"] += 1
        if step % args.log_every == 0:
            rate = window_tokens / (time.time() - window_start)
            record = dict(step=step, tokens=tokens, minutes=round((time.time() - start) / 60, 2),
                          tokens_per_s=round(rate),
                          **{k: round(sums[k] / sums["n"], 4) for k in terms})
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            sums = dict.fromkeys(terms, 0.0) | {"n": 0}
            window_tokens, window_start = 0, time.time()
        if step % args.eval_every == 0:
            curve.append(point(step, tokens))
            curve_path.write_text(json.dumps(curve, indent=1))
        if (time.time() - last_save) / 60 >= args.save_minutes:
            save_checkpoint(model, optimizer, step, tokens, out, tokenizer, args)
            last_save = time.time()
    if curve[-1]["step"] != step:
        curve.append(point(step, tokens))
        curve_path.write_text(json.dumps(curve, indent=1))
    save_checkpoint(model, optimizer, step, tokens, out, tokenizer, args)
    final = save_final(model, tokenizer, args, out, step, tokens)
    print(f"saved {final} after {step} steps, {tokens} tokens, {(time.time() - start) / 60:.1f} minutes", flush=True)
    return final


if __name__ == "__main__":
    main()
