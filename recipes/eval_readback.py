"""Quick read-back evaluation of a beacon adapter (GPU or CPU): pass key and synthetic needles, held-out text.

* pass key (`beacon_peft.needles`) at each ``--lengths`` with ``--cases`` keys over depths 0.05-0.85, at
  ``--ratio``; full attention beside it where the length fits the base model's positions;
* synthetic needles (`beacon_peft.training.synthetic`) built from the held-out essays, split into the phrasings
  the read-back stage trained on and those it held out (``held_out_templates`` of the adapter's
  ``readback_args.json``).

Greedy answers, scored by `beacon_peft.metrics.score_answer`. Each case records whether its needle sits in a
compressed window when the answer is read (``compressed``, `beacon_peft.needles.needle_compressed`); the table
scores those cases apart from all cases, since a needle in the open window is read from raw tokens, not from the
memory. Writes ``--out`` (json) and prints a markdown table.

    python recipes/eval_readback.py --adapter outputs/readback/final --lengths 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from beacon_peft.metrics import digit_similarity, score_answer
from beacon_peft.needles import make_passkey_case, needle_compressed
from beacon_peft.precision import DTYPE_NAMES, resolve_dtype


def greedy_text(model, tokenizer, ids: list[int], device, new: int = 12) -> str:
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--needle_cases", type=int, default=20, help="synthetic needles per template group and length")
    p.add_argument("--needle_lengths", type=int, nargs="*", default=[4096, 8192], help="none: no needles")
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--no_full", action="store_true", help="skip full attention (its answers do not depend on the "
                   "adapter: the same cases give the same figures)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="base model dtype; auto: bfloat16 where it is the fast path (beacon_peft.precision)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists():
        raise SystemExit(f"--out {args.out} exists: refusing to overwrite it (pass another path)")

    import beacon_peft  # noqa: F401  (registers BEACON)
    from beacon_peft.offline.corpora import essay_split, haystack_ids
    from beacon_peft.offline.weights import load_smollm2
    from beacon_peft.training import load_trained
    from beacon_peft.training.synthetic import TEMPLATES, retrieval_examples

    base, tok = load_smollm2(dtype=resolve_dtype(args.dtype, args.device))
    # with the folder's base LoRA (if any) unmerged: full attention (the adapter disabled) stays the plain base
    model = load_trained(args.adapter, base_model=base.to(args.device), merge_lora=False).eval()
    model.base_model.set_compression_ratio(args.ratio)
    config = model.peft_config[model.active_adapter]
    meta_path = Path(args.adapter) / "readback_args.json"
    held = json.loads(meta_path.read_text()).get("held_out_templates", []) if meta_path.is_file() else []
    hay = haystack_ids(tok, max(args.lengths) + 8192, "held_out")
    native = base.config.max_position_embeddings
    results: dict = {"adapter": args.adapter, "ratio": args.ratio, "passkey": [], "needles": []}
    start = time.time()
    for length in args.lengths:
        for c in tqdm(range(args.cases), desc=f"pass key {length}", unit="key"):
            depth = 0.05 + 0.8 * c / max(1, args.cases - 1)
            case = make_passkey_case(hay, tok, length, depth, seed=10_000 + length + c, filler_offset=c * 997)
            prompt = case["context_ids"] + case["question_ids"]
            row = dict(length=length, depth=round(case["depth_actual"], 3), answer=case["answer"],
                       compressed=needle_compressed(case, len(prompt), config.window, config.stride))
            text = greedy_text(model, tok, prompt, args.device)
            row.update(beacon=score_answer(text, case["answer"]), digits=digit_similarity(text, case["answer"]),
                       text=text)
            if args.no_full:
                row["full"] = None  # not run (the table says so); absent: beyond the base model's positions
            elif len(prompt) + 12 <= native:
                with model.disable_adapter():
                    row["full"] = score_answer(greedy_text(model, tok, prompt, args.device), case["answer"])
            results["passkey"].append(row)
    docs = [text for _, text in essay_split()[1]]
    groups = {"trained": [t for t in range(len(TEMPLATES)) if t not in held]}
    if held:
        groups["held_out"] = held
    for length in args.needle_lengths:
        for group, templates in groups.items():
            examples = retrieval_examples(tok, docs, args.needle_cases, length - 200, length - 8, seed=length,
                                          max_needles=4, templates=templates, as_ids=True)
            for ex in tqdm(examples, desc=f"needles {length} {group}", unit="needle"):
                value = ex["completion"].strip().rstrip(".")
                text = greedy_text(model, tok, ex["prompt_ids"], args.device, new=10)
                ok = score_answer(text, value)
                compressed = needle_compressed(ex, len(ex["prompt_ids"]), config.window, config.stride)
                results["needles"].append(dict(length=length, group=group, template=ex["template"],
                                               depth=round(ex["depth"], 3), compressed=compressed, ok=ok,
                                               answer=value, text=text))
    results["seconds"] = round(time.time() - start, 1)
    results["table"] = table(results, args.ratio, args.lengths, args.needle_lengths, list(groups))
    print(results["table"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


def _score(rows: list[dict], key: str) -> str:
    """``hits/cases`` over the cases whose needle was compressed, then over all cases."""
    inner = [r for r in rows if r["compressed"]]
    return f"{sum(r[key] for r in inner)}/{len(inner)} | {sum(r[key] for r in rows)}/{len(rows)}"


def table(results: dict, ratio: int, lengths: list[int], needle_lengths: list[int], groups: list[str]) -> str:
    """Markdown table of `main`'s results: beacon hits over the compressed-needle cases and over all cases, full
    attention over all cases ("not run" where a row's ``full`` is None, "beyond native positions" where a row has
    none), and the mean share of key digits right over the compressed-needle cases."""
    lines = [f"| test | length | beacon, needle compressed (ratio {ratio}) | beacon, all cases | full attention "
             "| key digits right, needle compressed |", "|---|---|---|---|---|---|"]
    for length in lengths:
        rows = [r for r in results["passkey"] if r["length"] == length]
        full = [r["full"] for r in rows if r.get("full") is not None]
        inner = [r["digits"] for r in rows if r["compressed"] and "digits" in r]
        lines.append(f"| pass key | {length} | {_score(rows, 'beacon')} | "
                     + (f"{sum(full)}/{len(full)} |" if full else "not run |" if any("full" in r for r in rows)
                        else "beyond native positions |")
                     + (f" {sum(inner) / len(inner):.0%} |" if inner else " |"))
    for length in needle_lengths:
        for group in groups:
            rows = [r for r in results["needles"] if r["length"] == length and r["group"] == group]
            lines.append(f"| needles, {group} phrasings | {length} | {_score(rows, 'ok')} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
