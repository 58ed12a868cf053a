"""The read-back stage's arguments: one dataclass, read by `transformers.HfArgumentParser` as `recipes/train.py`'s
are (`beacon_peft.training.arguments`).

Every field is a ``--flag`` and a YAML key of ``--config`` (a file of defaults: the command line wins); unknown
YAML keys are an error. `ReadbackArguments.__post_init__` does the cross-field checks, so arguments built in Python
are checked too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ...precision import DTYPE_NAMES

DESCRIPTION = "Read-back stage: teach a beacon adapter to answer from facts held only in compressed memory."


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ReadbackArguments:
    """Model, adapter, rows, loss weights, schedule, probes and output of one read-back run."""

    config: Optional[Path] = field(default=None, metadata={"help": "YAML file of defaults (command line wins)"})
    model: str = field(default="offline:smollm2", metadata={
        "help": "offline:smollm2 (the offline SmolLM2-135M) or a local model folder with its tokenizer"})
    device: str = field(default_factory=_default_device)
    dtype: str = field(default="auto", metadata={
        "choices": list(DTYPE_NAMES), "help": "base model dtype (adapter: fp32); auto: bfloat16 where it is the fast "
        "path (beacon_peft.precision), else float32"})
    window: int = 512
    ratios: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    sink_size: int = 1
    init_adapter: Optional[str] = field(default=None, metadata={
        "help": "start from this adapter folder (same settings; --beacon_projections may add projections it lacks, "
        "which start as copies of the base's: the model computes what the folder's adapter did)"})
    beacon_projections: list[str] = field(default_factory=lambda: ["q", "k", "v"], metadata={
        "choices": ["q", "k", "v", "o"],
        "help": "attention projections with a beacon copy (BeaconConfig.beacon_projections)"})
    base_lora_r: int = field(default=0, metadata={
        "help": "rank of a LoRA on the frozen base's own projections (the raw-token path, the readers of the "
        "compressed memory), trained with the beacon adapter and saved beside it in base_lora/ "
        "(beacon_peft.training.load_trained); 0 (default): beacon parameters only"})
    base_lora_alpha: int = 32
    base_lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "base projections the LoRA adapts (module names inside each attention block)"})
    min_tokens: int = 2048
    max_tokens: int = 8192
    batch_size: int = 4
    text_fraction: float = 0.3
    recall_fraction: float = field(default=0.0, metadata={
        "help": "share of recall rows: whole windows of source, then quotes read back from its compressed memory "
        "(beacon_peft.training.readback.MixedRows); text_fraction + recall_fraction <= 1"})
    composed_fraction: float = field(default=0.0, metadata={
        "help": "share of composed retrieval rows: facts composed from holder/attribute/statement/question parts of "
        "the training split (beacon_peft.training.phrasings); with it on, half the recall rows' needles are composed "
        "too; text + recall + composed fractions <= 1"})
    kinds_fraction: float = field(default=0.0, metadata={
        "help": "share of the composed rows' facts and the recall rows' needles drawn from the training part of the "
        "retrieval evaluation's phrasings (beacon_peft.eval_facts: numbers, names, dates, codes); in [0, 1]"})
    held_out_templates: list[int] = field(default_factory=lambda: [2, 6, 8], metadata={
        "nargs": "*", "help": "synthetic.TEMPLATES indices never trained on (scored as unseen phrasings)"})
    answer_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 1.0
    hidden_weight: float = field(default=0.0, metadata={
        "help": "weight of the layer-wise hidden-state distance to the full-attention base on every raw token "
        "(beacon_peft.training.readback.hidden_distance); 0: off"})
    lr: float = 5e-4
    warmup_steps: int = 20
    max_steps: int = 100000
    max_minutes: float = 60.0
    eval_every: int = 100
    probe_cases: int = 12
    probe_ratio: int = field(default=8, metadata={
        "help": "compression ratio of the curve's probes (key information, context gain)"})
    save_minutes: float = 5.0
    log_every: int = 10
    workers: int = 4
    seed: int = 0
    output_dir: Path = Path("outputs/readback")
    resume: bool = field(default=False, metadata={"help": "continue from output_dir/checkpoint"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh in an output_dir holding an earlier run (checkpoint/, final/, curve.json), replacing "
        "it; without it (or --resume) such a run is refused"})
    gradient_checkpointing: bool = False
    logit_chunk: int = field(default=0, metadata={
        "help": "positions whose vocabulary-sized logits exist at once in the losses, each chunk recomputed in the "
        "backward (beacon_peft.training.readback.head_losses), e.g. 1024 for 8K-token rows on 24 GiB; 0 (default): "
        "all at once, nothing recomputed (faster where the full logits fit)"})

    def __post_init__(self):
        if self.max_tokens > 8192:
            raise ValueError(f"max_tokens={self.max_tokens}: the full-attention teacher reads at most the base "
                             "model's 8192 positions: allowed <= 8192")
        if not 64 <= self.min_tokens <= self.max_tokens - 8:
            raise ValueError(f"min_tokens={self.min_tokens}: allowed [64, max_tokens - 8 = {self.max_tokens - 8}]")
        if self.probe_ratio not in self.ratios:
            raise ValueError(f"probe_ratio={self.probe_ratio}: the probes run at a ratio the adapter trains: allowed "
                             f"one of ratios {self.ratios}")
        if self.base_lora_r < 0 or self.base_lora_alpha <= 0:
            raise ValueError(f"base_lora_r={self.base_lora_r}, base_lora_alpha={self.base_lora_alpha}: allowed "
                             "base_lora_r >= 0 (0: no LoRA) and base_lora_alpha > 0")
        if self.logit_chunk < 0:
            raise ValueError(f"logit_chunk={self.logit_chunk}: allowed >= 0 (0: all positions at once)")
        for name in ("answer_weight", "kl_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: a loss weight: allowed >= 0")
        for name, low in (("batch_size", 1), ("max_steps", 1), ("eval_every", 1), ("log_every", 1),
                          ("probe_cases", 1), ("warmup_steps", 0), ("workers", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed >= {low}")
        for name in ("lr", "temperature", "max_minutes", "save_minutes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed > 0")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: allowed 'cpu', 'cuda' or 'cuda:N'")

    def record(self) -> dict:
        """The arguments as JSON values (paths as strings), in field order: ``readback_args.json``."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


def make_parser():
    """`transformers.HfArgumentParser` over `ReadbackArguments` (``--held_out_templates`` takes zero values too)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ReadbackArguments, description=DESCRIPTION)
    for action in parser._actions:
        nargs = ReadbackArguments.__dataclass_fields__.get(action.dest)
        if nargs is not None and "nargs" in nargs.metadata:  # HfArgumentParser makes every list nargs="+"
            action.nargs = nargs.metadata["nargs"]
    return parser


def parse_args(argv: Optional[list[str]] = None) -> ReadbackArguments:
    """Parse ``argv`` (default ``sys.argv[1:]``), with ``--config file.yaml`` supplying defaults, and check."""
    parser = make_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        import yaml

        defaults = yaml.safe_load(Path(first.config).read_text()) or {}
        unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
        if unknown:
            raise ValueError(f"{first.config}: unknown keys {unknown}")
        parser.set_defaults(**defaults)
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args
