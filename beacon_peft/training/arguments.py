"""Command-line / YAML arguments of the training recipe: four dataclasses read by one `trl.TrlParser`.

Every field is a ``--flag`` and a YAML key; unknown YAML keys are an error. `validate_args` does the cross-field
checks that need no model or data and returns the `BeaconConfig` the run trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig, TrlParser

from ..config import BeaconConfig
from ..precision import autocast_off_without_gpu
from .data import STAGES

# --ratio_mix -> the adapter's ratio_mix; `step` forces one ratio per optimizer step with a callback
RATIO_MIXES = {"step": "step-random", "sequence": "instance-random", "window": "step-random"}
RATIO_MIX_HELP = {"step": "one ratio per optimizer step from the seed", "sequence": "one ratio per sequence",
                  "window": "one ratio per window"}


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
    beacon_rank: Optional[int] = field(
        default=None,
        metadata={"help": "None (default, as the official code): each beacon projection is a full trainable copy "
                          "of the base projection. An int: the frozen base projection plus a trainable low-rank "
                          "delta B @ A of that rank (B starts at zero). Llama-3-8B: 74M trainable parameters at "
                          "rank 128 instead of 789M, for QLoRA runs on one 24 GB GPU."},
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
            beacon_rank=self.beacon_rank,
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
                          "the activation memory, and 2.1 GB less weights for Llama-3-8B."},
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
    if beacon_args.ratio_seed is not None and beacon_args.ratio_seed < 0:
        raise ValueError(f"ratio_seed={beacon_args.ratio_seed} must be >= 0")
    return config
