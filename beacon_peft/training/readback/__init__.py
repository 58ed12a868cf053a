"""The read-back stage: teach a beacon adapter to answer from facts held only in compressed memory
(docs/training.md, "Read-back stage"; `recipes/train_readback.py` runs it).

Modules: `rows` (the mixed row stream: plain text, retrieval, recall and composed rows; `collate_rows`), `losses`
(the chunked head losses, the layer-wise hidden distance, the decoder/head check), `arguments` (`ReadbackArguments`,
parsed from YAML + command line), `modeling` (base, base LoRA, beacon adapter, ``--init_adapter``), `probes` (the
training curve's held-out probes), `checkpoint` (resumable checkpoint, final folder), `loop` (`train`).
"""

from __future__ import annotations

from ...labels import IGNORE_INDEX
from .arguments import ReadbackArguments, parse_args
from .loop import train
from .losses import HEAD_TERMS, decoder_and_head, head_losses, hidden_distance
from .rows import MixedRows, collate_rows

__all__ = ["HEAD_TERMS", "IGNORE_INDEX", "MixedRows", "ReadbackArguments", "collate_rows", "decoder_and_head",
           "head_losses", "hidden_distance", "parse_args", "train"]
