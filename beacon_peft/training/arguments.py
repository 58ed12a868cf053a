"""Command-line / YAML arguments of the training recipe: four dataclasses read by one `trl.TrlParser`.

Every field is a ``--flag`` and a YAML key; unknown YAML keys are an error. `validate_args` does the cross-field
checks that need no model or data and returns the `BeaconConfig` the run trains.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

from trl import SFTConfig, TrlParser

from ..config import EMBED_INITS, PLACEMENTS, PROJECTIONS, RATIO_MIXES, SCOPES, BeaconConfig
from ..precision import autocast_off_without_gpu

logger = logging.getLogger(__name__)

_CONFIG_FIELDS = {f.name: f for f in fields(BeaconConfig)}
CONFIG_CHOICES = {"ratio_mix": RATIO_MIXES, "placement": PLACEMENTS, "attention_scope": SCOPES,
                  "embed_init": EMBED_INITS, "beacon_projections": PROJECTIONS}
# BeaconConfig's own fields (PeftConfig's aside) are BeaconArguments fields (MIRRORED_FIELDS) except these: the
# module selection, and ratio_seed (training draws from the global `random` that Trainer seeds and checkpoints, so
# a resumed run continues the same ratio sequence)
NOT_ARGUMENTS = ("target_modules", "target_parameters", "ratio_seed")
MIRRORED_FIELDS = ("window", "stride", "ratios", "ratio_mix", "adapt_future_tokens", "sink_size", "beacon_projections",
                   "beacon_rank", "placement", "attention_scope", "attend_prev", "embed_init", "beacon_layers",
                   "mask_first_window_loss", "group_tokens")
STAGES = ("pretrain", "finetune")
OFFLINE_DATA = ("essays:train", "offline:all", "offline:retrieval")  # data sets `data.load_documents` makes offline
OLD_RATIO_MIXES = {"window": "step-random", "sequence": "instance-random", "step": "step-random"}


@dataclass
class ScriptArguments:
    """Data and output arguments."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training data: a local .txt/.jsonl/.json/.parquet file, a folder of such files (or a folder "
            "written by `Dataset.save_to_disk`), a `datasets` hub name, or `essays:train` (the bundled Paul Graham "
            "training essays) / `offline:all` (those plus the other offline corpora), or `offline:retrieval` "
            "(synthetic needle/QA examples built from those, for --stage finetune; see "
            "beacon_peft.training.synthetic). Held-out essays are refused."
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
    chat_template: bool = field(
        default=True,
        metadata={"help": "finetune: format examples with the tokenizer's chat template (when it has one). `false`: "
                          "raw text, prompt and completion concatenated exactly as given, then EOS (how "
                          "`offline:retrieval` data and the benchmarks' raw prompts read)."},
    )
    retrieval_examples: int = field(
        default=2000,
        metadata={"help": "`offline:retrieval`: how many synthetic needle/QA examples to generate (from --seed)."},
    )
    retrieval_ask_all: bool = field(
        default=False,
        metadata={"help": "`offline:retrieval`: after the first answer, ask about every other needle in turn (each "
                          "answer labelled), so one compressed context trains several retrievals."},
    )
    retrieval_text_fraction: float = field(
        default=0.0,
        metadata={"help": "`offline:retrieval`: fraction in [0, 1) of the rows that are plain training text with "
                          "loss on every token (keeps the plain-text stage's language modelling)."},
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir (or final_dir) that holds an earlier run's checkpoints or adapter, "
                          "replacing them; without it such a run is refused (continue one with "
                          "--resume_from_checkpoint)."},
    )


def config_field(name: str, help: Optional[str] = None, **metadata):
    """A `BeaconArguments` field that *is* `BeaconConfig.<name>`: its default and allowed values are the config's
    (``help`` replaces the config's own help where the command line needs more)."""
    source = _CONFIG_FIELDS[name]
    metadata = {"help": help or source.metadata["help"], **metadata}
    if name in CONFIG_CHOICES:
        metadata.setdefault("choices", list(CONFIG_CHOICES[name]))
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)


@dataclass
class BeaconArguments:
    """The adapter (`beacon_peft.BeaconConfig`: same names, defaults and allowed values) and how compression ratios
    are drawn in training."""

    window: int = config_field("window")
    stride: Optional[int] = config_field("stride")
    ratios: list[int] = config_field("ratios", "Candidate compression ratios (each 0 or a divisor of stride).")
    ratio_mix: str = config_field(
        "ratio_mix",
        "How the adapter draws a ratio (saved in the adapter): `step-random` one per window step (the official "
        "training default), `instance-random` one per sequence, `fixed` the one ratio, `adapt` per sequence the "
        "smallest that fits the base model's positions. Both random modes draw from the global `random` that "
        "Trainer seeds and checkpoints. Old names: `window` = step-random, `sequence` = instance-random, `step` = "
        "step-random with --ratio_per_optimizer_step.",
        choices=[*RATIO_MIXES, *OLD_RATIO_MIXES],
    )
    ratio_per_optimizer_step: bool = field(
        default=False,
        metadata={"help": "Training only: force one ratio per optimizer step on every window of every micro-batch "
                          "and rank, a pure function of --optimizer_step_ratio_seed and the step (logged as "
                          "`compression_ratio`); the adapter keeps --ratio_mix for inference."},
    )
    optimizer_step_ratio_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Seed of --ratio_per_optimizer_step (default: --seed). Old name: --ratio_seed.",
                  "aliases": ["--ratio_seed"]},
    )
    adapt_future_tokens: int = config_field("adapt_future_tokens")
    sink_size: int = config_field("sink_size")
    beacon_projections: list[str] = config_field("beacon_projections")
    beacon_rank: Optional[int] = config_field(
        "beacon_rank",
        "None (default, as the official code): each beacon projection is a full trainable copy of the base "
        "projection. An int: the frozen base projection plus a trainable low-rank delta B @ A of that rank (B starts "
        "at zero), far fewer trainable parameters (docs/training.md sizes it for 8B models on one GPU).",
    )
    placement: str = config_field("placement")
    attention_scope: str = config_field("attention_scope")
    attend_prev: bool = config_field("attend_prev")
    embed_init: str = config_field("embed_init")
    beacon_layers: Optional[list[int]] = config_field("beacon_layers")
    mask_first_window_loss: Optional[bool] = config_field("mask_first_window_loss")
    group_tokens: Optional[int] = config_field("group_tokens")
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

    def __post_init__(self):
        if self.ratio_mix in OLD_RATIO_MIXES:  # the names of the first training recipe
            new = OLD_RATIO_MIXES[self.ratio_mix]
            if self.ratio_mix == "step":
                self.ratio_per_optimizer_step = True
            logger.warning("ratio_mix=%r is an old name: ratio_mix=%r%s", self.ratio_mix, new,
                           " with ratio_per_optimizer_step=true" if self.ratio_mix == "step" else "")
            self.ratio_mix = new

    def to_config(self) -> BeaconConfig:
        """The adapter config these arguments describe."""
        values = {name: copy.deepcopy(getattr(self, name)) for name in MIRRORED_FIELDS}
        # the random modes draw from the global `random` that Trainer seeds and saves, so resumes are exact
        return BeaconConfig(**values, ratio_seed=None)


@dataclass
class ModelArguments:
    """The base model (TRL `ModelConfig` names) and the optional LoRA on it."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Base model: a hub id, a local folder, or `offline:smollm2` (SmolLM2-135M-Instruct "
                          "converted offline by `beacon_peft.offline.weights.smollm2_dir()`)."},
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
    upcast_unquantized: bool = field(
        default=True,
        metadata={"help": "With --load_in_4bit: cast the parameters left unquantized (embeddings, norms, lm_head) "
                          "to fp32, as peft's `prepare_model_for_kbit_training` does. `false` keeps them in --dtype, "
                          "so the residual stream (the activations gradient checkpointing keeps) stays bf16: half "
                          "the activation memory and smaller weights (docs/training.md sizes both)."},
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
        autocast_off_without_gpu(self)  # before SFTConfig turns bf16=None into True and refuses it on a CPU
        super().__post_init__()


def make_parser() -> TrlParser:
    """`trl.TrlParser` over (ScriptArguments, BeaconArguments, BeaconSFTConfig, ModelArguments)."""
    return TrlParser((ScriptArguments, BeaconArguments, BeaconSFTConfig, ModelArguments))


def parse_args(argv: Optional[list[str]] = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), with ``--config file.yaml`` supplying defaults, and validate."""
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
    if script_args.retrieval_examples < 1:
        raise ValueError(f"retrieval_examples={script_args.retrieval_examples} must be >= 1")
    if not 0.0 <= script_args.retrieval_text_fraction < 1.0:
        raise ValueError(f"retrieval_text_fraction={script_args.retrieval_text_fraction} must be in [0, 1)")
    if model_args.use_lora and model_args.lora_r <= 0:
        raise ValueError(f"lora_r={model_args.lora_r} must be positive")
    seed = beacon_args.optimizer_step_ratio_seed
    if seed is not None and seed < 0:
        raise ValueError(f"optimizer_step_ratio_seed={seed} must be >= 0")
    _check_schedule(training_args)
    return config


def _check_schedule(training_args) -> None:
    """What the Trainer takes without a word but cannot train with: no step, no example, a negative rate."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ValueError(f"{name}={getattr(training_args, name)} is out of range: allowed >= 1")
    if not training_args.learning_rate > 0:
        raise ValueError(f"learning_rate={training_args.learning_rate} is out of range: allowed > 0")
    if training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise ValueError(f"max_steps={training_args.max_steps} and num_train_epochs={training_args.num_train_epochs} "
                         "train nothing: allowed max_steps >= 1, or max_steps -1 (the default) with "
                         "num_train_epochs > 0")
