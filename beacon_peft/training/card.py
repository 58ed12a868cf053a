"""The model card (``README.md``) of a trained adapter folder, and the record of a run it reports.

`TrainingRecord` holds the figures of a finished run (optimizer steps, tokens seen, wall time, losses); it is
stored under ``"record"`` in the folder's ``training_log.json`` and read back by `TrainingRecord.read`. The card of
a run started from an earlier stage's adapter (``--init_adapter``) takes that stage's figures from its record to
total both stages, and embeds the earlier card's data and training sections so that one card tells the adapter's
whole history.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from ..config import BeaconConfig
from .arguments import OFFLINE_DATA
from .modeling import LORA_DIR, OFFLINE_MODELS, hub_name, resolve_model_path

TRAINING_LOG = "training_log.json"


@dataclass(frozen=True)
class TrainingRecord:
    """The figures of one finished run, as its model card shows them (``training_log.json`` → ``"record"``)."""

    optimizer_steps: int
    epochs: float
    tokens_seen: Optional[int]  # non-padding input tokens (Trainer's ``num_input_tokens_seen``)
    wall_time_s: Optional[float]  # wall time of train(); a resumed run: this session only
    final_loss: Optional[float]  # the last logged training loss
    train_loss: Optional[float]  # Trainer's mean training loss

    @classmethod
    def from_trainer(cls, trainer, info: dict) -> "TrainingRecord":
        """The record of ``trainer``'s run; ``info`` is ``trainer.card_info`` (`card_info`, plus ``wall_time_s``
        and ``train_loss`` once train() returned)."""
        state = trainer.state
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        return cls(optimizer_steps=state.global_step, epochs=state.epoch or 0.0,
                   tokens_seen=state.num_input_tokens_seen or None, wall_time_s=info.get("wall_time_s"),
                   final_loss=losses[-1] if losses else None, train_loss=info.get("train_loss"))

    @classmethod
    def from_log(cls, log: dict) -> "TrainingRecord":
        """The record in a parsed ``training_log.json``. A log written before records existed has only Trainer's
        ``log_history``: the figures are taken from it (wall time: Trainer's ``train_runtime``)."""
        if "record" in log:
            return cls(**{f.name: log["record"].get(f.name) for f in fields(cls)})
        history = log.get("log_history", [])

        def last(key):
            return next((h[key] for h in reversed(history) if key in h), None)

        return cls(optimizer_steps=last("step") or 0, epochs=last("epoch") or 0.0,
                   tokens_seen=last("num_input_tokens_seen") or None, wall_time_s=last("train_runtime"),
                   final_loss=last("loss"), train_loss=last("train_loss"))

    @classmethod
    def read(cls, folder) -> Optional["TrainingRecord"]:
        """The record of the adapter folder ``folder``; None when it has no ``training_log.json``."""
        path = Path(folder) / TRAINING_LOG
        return cls.from_log(json.loads(path.read_text())) if path.is_file() else None

    def to_json(self) -> dict:
        return asdict(self)


def _retrieval_mix(script_args) -> str:
    """The `offline:retrieval` options that change what the loss covers, for the model card."""
    if script_args.dataset_name != "offline:retrieval":
        return ""
    parts = [" (every needle asked in turn)"] if script_args.retrieval_ask_all else []
    if script_args.retrieval_text_fraction:
        parts.append(f"; {script_args.retrieval_text_fraction:.0%} of the rows plain training text, loss on every "
                     "token")
    return "".join(parts)


RATIO_MIX_MEANING = {"fixed": "the one ratio", "step-random": "one ratio per window step",
                     "instance-random": "one ratio per sequence",
                     "adapt": "per sequence, the smallest ratio that fits the base model's positions"}


def ratio_sampling(beacon_args, seed: int) -> str:
    """How a run draws its compression ratios, in words; ``seed`` is that of ``ratio_per_optimizer_step``."""
    if beacon_args.ratio_per_optimizer_step:
        return f"one ratio per optimizer step from seed {seed} (`ratio_per_optimizer_step`)"
    return f"`{beacon_args.ratio_mix}`: {RATIO_MIX_MEANING[beacon_args.ratio_mix]}"


def card_info(script_args, beacon_args, training_args, model_args, config: BeaconConfig, model, n_documents: int,
              train_dataset, command: str, resumed_from) -> dict:
    """What the model card reports that the trainer does not know (a dict, ``trainer.card_info``)."""
    from .callbacks import optimizer_step_seed

    trainable = [p for p in model.parameters() if p.requires_grad]
    lengths = train_dataset["length"]
    name = model_args.model_name_or_path
    dataset = script_args.dataset_name
    return dict(
        config=config,
        base_model=hub_name(name),
        base_note=OFFLINE_MODELS[name][1] if name in OFFLINE_MODELS else None,
        base_path=resolve_model_path(name),
        base_load="str(beacon_peft.offline.weights.smollm2_dir())" if name in OFFLINE_MODELS else None,
        dataset=dataset,
        dataset_is_hub=not (dataset in OFFLINE_DATA or os.path.exists(dataset)),
        stage=script_args.stage,
        stage_help="plain text, loss on every token" if script_args.stage == "pretrain"
        else ("chat template" if script_args.chat_template else "raw text, no chat template")
        + ", loss on the answer only" + _retrieval_mix(script_args),
        init_adapter=beacon_args.init_adapter,
        ratio_sampling=ratio_sampling(beacon_args, optimizer_step_seed(beacon_args, training_args)),
        n_documents=n_documents,
        n_sequences=len(train_dataset),
        length_range=f"{min(lengths)}-{max(lengths)}",
        min_length=script_args.min_length or config.window + 1,
        max_length=training_args.max_length,
        trainable_params=sum(p.numel() for p in trainable),
        beacon_bytes=sum(p.numel() * p.element_size() for p in trainable),
        trainable_dtype=", ".join(sorted({str(p.dtype).replace("torch.", "") for p in trainable})),
        use_lora=model_args.use_lora,
        hardware=hardware_line(training_args.world_size),
        precision=precision_line(training_args, model_args, model),
        command=command,
        resumed_from=resumed_from,
    )


def precision_line(training_args, model_args, model) -> str:
    """Autocast, base dtype (or 4-bit type) and gradient checkpointing, for the card."""
    parts = ["bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "no autocast"]
    base_dtype = str(model.get_base_model().dtype).replace("torch.", "")
    parts.append(f"4-bit {model_args.bnb_4bit_quant_type} base" if model_args.load_in_4bit
                 else f"{base_dtype} base")
    if training_args.gradient_checkpointing:
        parts.append("gradient checkpointing")
    return ", ".join(parts)


def hardware_line(world_size: int) -> str:
    """GPU name and count, or the CPU model and its usable cores, for the card."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"{world_size} x {name}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU only: {cpu}, {cores} cores usable, {world_size} process(es)"


def _fmt_float(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_int(n) -> str:
    return f"{int(n):,}" if n is not None else "n/a"


def model_card(trainer, info: dict, record: Optional[TrainingRecord] = None) -> str:
    """README.md of the adapter folder: base model, beacon settings, data and training figures.

    ``info`` is ``trainer.card_info`` (`card_info`); ``record`` the run's figures (default: taken from
    ``trainer`` and ``info`` by `TrainingRecord.from_trainer`).
    """
    record = record or TrainingRecord.from_trainer(trainer, info)
    lines = (_front_matter(info) + _usage(info) + _settings(info) + _data(info) + _training(trainer.args, info, record)
             + earlier_stage(info.get("init_adapter"), record))
    return "\n".join(line for line in lines if line is not None)


def _front_matter(info: dict) -> list[str]:
    """The Hub's YAML header (base model, library, tags, data set)."""
    datasets_meta = f"datasets:\n- {info['dataset']}\n" if info.get("dataset_is_hub") else ""
    return [
        "---",
        f"base_model: {info['base_model']}",
        "library_name: peft",
        "tags:",
        "- activation-beacon",
        "- peft",
        "- beacon_peft",
        "- long-context",
        "- context-compression",
        "- trl",
        "- sft",
        *([datasets_meta.rstrip("\n")] if datasets_meta else []),
        "---",
        "",
    ]


def _usage(info: dict) -> list[str]:
    """Title, what the adapter is, and how to load it (with the base LoRA when the run trained one)."""
    config: BeaconConfig = info["config"]
    base = info["base_model"]
    lines = [
        f"# Activation Beacon adapter for `{base}`",
        "",
        *([f"{info['base_note']}.", ""] if info.get("base_note") else []),
        "Activation Beacon (arXiv 2401.03462) condenses the key/values of every window of raw tokens into a few "
        "beacon activations, so the base model reads long inputs through a compressed memory. This folder is a "
        "`beacon_peft` PEFT adapter: only the beacon parameters below were trained; the base model is unchanged.",
        "",
        "```python",
        "import beacon_peft  # registers the BEACON adapter type",
        *(["import beacon_peft.offline.weights"] if info.get("base_load") else []),
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'base = AutoModelForCausalLM.from_pretrained({info.get("base_load") or repr(info.get("base_path", base))})',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        f"model.base_model.set_compression_ratio({max(r for r in config.ratios)})  # or None: ratio_mix="
        f"{config.ratio_mix!r}",
        "```",
        "",
    ]
    if info.get("use_lora"):
        lines += [f"This run also trained a LoRA on the base projections; it is in `{LORA_DIR}/` (a standard PEFT "
                  "LoRA adapter of the base model). Apply it first (`PeftModel.from_pretrained(base, "
                  f"'{LORA_DIR}').merge_and_unload()`), then this adapter (`beacon_peft.training.load_trained`).", ""]
    return lines


def _settings(info: dict) -> list[str]:
    """The beacon settings table."""
    config: BeaconConfig = info["config"]
    trainable, beacon_bytes = info.get("trainable_params"), info.get("beacon_bytes")
    return [
        "## Beacon settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| window / stride | {config.window} / {config.stride} |",
        f"| compression ratios | {config.ratios} |",
        f"| ratio sampling in training | {info['ratio_sampling']} |",
        f"| placement / attention scope | {config.placement} / {config.attention_scope} "
        f"(attend_prev={config.attend_prev}) |",
        f"| sink size | {config.sink_size} |",
        f"| beacon projections | {', '.join(config.beacon_projections)} "
        f"({'all layers' if config.beacon_layers is None else 'layers ' + str(config.beacon_layers)}; "
        f"{'full copies' if config.beacon_rank is None else f'frozen base + rank-{config.beacon_rank} delta'}) |",
        f"| beacon embedding init | {config.embed_init} token |",
        f"| first window in the loss | {'masked' if config.masks_first_window() else 'included'} |",
        f"| trainable parameters | {_fmt_int(trainable)} ({info.get('trainable_dtype', '')}"
        f"{', ' + _fmt_bytes(beacon_bytes) if beacon_bytes else ''}) |",
        "",
    ]


def _data(info: dict) -> list[str]:
    """What the run trained on."""
    lines = [
        "## Data",
        "",
        f"- dataset: `{info['dataset']}` (stage `{info['stage']}`: {info['stage_help']})",
        f"- training sequences: {_fmt_int(info.get('n_sequences'))} from {_fmt_int(info.get('n_documents'))} "
        f"records; lengths {info.get('length_range', 'n/a')} tokens (min_length {info.get('min_length')}, "
        f"max_length {info.get('max_length')}); no packing, batches grouped by length when "
        "`train_sampling_strategy=group_by_length`",
    ]
    if info["dataset"] in OFFLINE_DATA:
        lines.append("- the held-out essays of `beacon_peft.offline.corpora` (HELD_OUT_ESSAYS) were not trained on")
    return lines


def _training(args, info: dict, record: TrainingRecord) -> list[str]:
    """The training figures table and the command that ran."""
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("torch", "transformers", "peft", "trl", "accelerate") if _has_dist(p))
    wall = record.wall_time_s
    lines = [
        "",
        "## Training",
        "",
        "| figure | value |",
        "|---|---|",
        f"| optimizer steps | {record.optimizer_steps} (epochs {record.epochs or 0:.2f}) |",
        f"| effective batch | {effective_batch} sequences ({args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {args.world_size} processes) |",
        f"| learning rate | {args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
        f", warmup {args.warmup_steps or 0}) |",
        f"| tokens seen (non-padding) | {_fmt_int(record.tokens_seen)} |",
        f"| wall time of train() | {'n/a' if wall is None else f'{wall:.1f} s'}"
        f"{' (resumed run: this session only)' if info.get('resumed_from') else ''} |",
        f"| final logged training loss | {_fmt_float(record.final_loss)} |",
        f"| mean training loss | {_fmt_float(record.train_loss)} |",
        f"| precision | {info.get('precision', 'n/a')} |",
        f"| hardware | {info.get('hardware', 'n/a')} |",
        f"| software | {versions} |",
    ]
    if info.get("resumed_from"):
        lines.append(f"| resumed from | `{info['resumed_from']}` |")
    return lines + ["", "Command:", "", "```bash", info.get("command", ""), "```", ""]


def earlier_stage(folder, record: TrainingRecord) -> list[str]:
    """Card lines for the stage this run started from (``--init_adapter``): the totals over both stages (from
    the earlier folder's `TrainingRecord` and this run's ``record``) and the earlier card's data and training
    sections (headings demoted), so one card tells the adapter's whole history."""
    if not folder:
        return []
    lines = ["## Earlier stage", "", f"This run started from the beacon weights of `{folder}`."]
    earlier = TrainingRecord.read(folder)
    if earlier is not None and earlier.tokens_seen and record.tokens_seen:
        total_wall = (f", {earlier.wall_time_s + record.wall_time_s:.1f} s of train() wall time"
                      if earlier.wall_time_s is not None and record.wall_time_s is not None else "")
        lines.append(f"Both stages together: {earlier.tokens_seen + record.tokens_seen:,} tokens seen{total_wall}.")
    card = Path(folder) / "README.md"
    if not card.is_file():
        return lines + ["(That folder has no model card.)", ""]
    text = card.read_text(encoding="utf-8")
    body = text[text.find("## Data"):] if "## Data" in text else ""
    lines += ["", *[("#" + line if line.startswith("## ") else line) for line in body.rstrip().splitlines()], ""]
    return lines


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
