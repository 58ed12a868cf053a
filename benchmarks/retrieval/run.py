"""Retrieval: pass key (one needle, context length x depth grid) and multi-key (4 named needles, one asked).

Cases come from ``beacon_peft/needles.py`` over held-out essays: ``context_tokens`` tokens exactly (intro, filler,
needle(s)), then the question; the answer is read greedily (``max_new_tokens``, stopping at EOS) and is correct when
the key appears in it as a whole number (``beacon_peft.metrics.score_answer``); a pass key also gets partial credit,
its digit similarity (``beacon_peft.metrics.digit_similarity``: 1 - edit distance of the first digit run / key
length). Full attention and beacons run in this process (``model.generate``), kvpress presses in their worker
(context compressed, question and answer not). Full attention and kvpress only run where context + question + answer
fit the model's native positions.

Full attention is deterministic and does not depend on the adapters, so a run that compares adapters may take its
answers from an earlier result file (``--full-from RESULT.json``) made with the same model folder, hardware, dtype,
device, threads, seed, new-token budget and torch / transformers versions, for the same cases (checked case by case;
anything else is a ValueError before any work); cases the file lacks are run. The result says where they came from.

    python -m benchmarks.retrieval.run --quick      # or --full (GPU), --lengths 1024 4096 ...
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from beacon_peft.metrics import digit_similarity, score_answer
from beacon_peft.needles import make_multikey_case, make_passkey_case
from benchmarks.common import measure, report
from benchmarks.common.harness import (
    Bench,
    Method,
    earlier_result,
    runner_main,
    with_overrides,
)

BENCHMARK = "retrieval"


@dataclass
class Settings:
    lengths: list[int]
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cases: int = 1  # pass-key cases per (length, depth) cell
    multikey_cases: int = 1  # multi-key cases per length
    n_keys: int = 4
    max_new_tokens: int = 10


SETTINGS = {
    "quick": Settings([1024, 2048]),
    "full": Settings([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], cases=3, multikey_cases=5),
    # 8,150 context tokens: question and answer still fit full attention's 8,192 positions (SmolLM2)
    "long": Settings([8150, 16384, 32768]),
}


def make_cases(bench: Bench, s: Settings) -> list[dict]:
    """Every case, with ``task`` ("passkey"/"multikey"), ``length``, ``cell`` (depth index or None), ``key``."""
    from beacon_peft.offline.corpora import haystack_ids

    hay = haystack_ids(bench.tokenizer, max(s.lengths), "held_out")
    cases = []
    for length in s.lengths:
        for di, depth in enumerate(s.depths):
            for c in range(s.cases):
                seed = bench.args.seed * 1_000_003 + length * 31 + di * 7 + c
                case = make_passkey_case(hay, bench.tokenizer, length, depth, seed,
                                         filler_offset=random.Random(seed).randrange(len(hay)))
                cases.append(dict(case, task="passkey", length=length, cell=di, key=["passkey", length, di, c]))
        for c in range(s.multikey_cases):
            seed = bench.args.seed * 1_000_003 + length * 31 + 5_000 + c
            case = make_multikey_case(hay, bench.tokenizer, length, seed, n_keys=s.n_keys,
                                      filler_offset=random.Random(seed).randrange(len(hay)))
            cases.append(dict(case, task="multikey", length=length, cell=None, key=["multikey", length, c]))
    return cases


def run(bench: Bench, s: Settings) -> str:
    """Measure, write results/<mode>.{json,md,png}, add summary records; returns the markdown."""
    cases = make_cases(bench, s)
    fits = {tuple(c["key"]): bench.fits(len(c["context_ids"]) + len(c["question_ids"]) + s.max_new_tokens)
            for c in cases}
    full = Method("full", "full")
    full_only = getattr(bench.args, "full_only", False)
    local = [full] + ([] if full_only else bench.beacon_methods(bench.ratios))
    presses = [] if full_only else bench.press_methods(bench.ratios)
    full_from = getattr(bench.args, "full_from", None)
    reused = reused_full_answers(bench, s, full_from, cases) if full_from is not None else {}
    answers = [_answer_from_text(bench, full, c, reused[tuple(c["key"])]) for c in cases
               if tuple(c["key"]) in reused]  # one row per (method, case)
    todo = [(m, c) for m in local for c in cases
            if m.kind != "full" or (fits[tuple(c["key"])] and tuple(c["key"]) not in reused)]
    pad = bench.tokenizer.pad_token_id if bench.tokenizer.pad_token_id is not None else bench.tokenizer.eos_token_id
    for m, c in tqdm(todo, desc="retrieval", unit="case"):
        with bench.use(m) as model:
            ids = measure.greedy(model, c["context_ids"] + c["question_ids"], s.max_new_tokens, pad, bench.device)
        answers.append(_answer(bench, m, c, ids))
    jobs = [dict(kind="generate", id=c["key"], context_ids=c["context_ids"], question_ids=c["question_ids"],
                 max_new_tokens=s.max_new_tokens, stop_at_eos=True,
                 presses=[dict(name=m.press, compression_ratio=m.compression_ratio) for m in presses])
            for c in cases if fits[tuple(c["key"])]] if presses else []
    result = bench.kvpress(jobs)
    if result is not None:
        by_key = {tuple(c["key"]): c for c in cases}
        by_press = {(m.press, m.compression_ratio): m for m in presses}
        for meas in result["measurements"]:
            for r in meas["results"]:
                m = by_press[(r["press"], r["compression_ratio"])]
                answers.append(_answer(bench, m, by_key[tuple(meas["id"])], r["generated_ids"]))

    methods = list(dict.fromkeys(a["method"] for a in answers))
    by_method = {m.name: m for m in local + presses}
    acc = _accuracy(answers)
    for (name, task, length), value in sorted(acc["by_length"].items()):
        metric = "passkey_accuracy" if task == "passkey" else "multikey_accuracy"
        bench.record(BENCHMARK, by_method[name], length, metric, value)
    for (name, length), value in sorted(acc["digits"].items()):
        bench.record(BENCHMARK, by_method[name], length, "passkey_digit_similarity", value)
    markdown = _tables(bench, s, methods, acc)
    payload = dict(settings=vars(s), accuracy=[dict(method=k[0], task=k[1], context_tokens=k[2], accuracy=v)
                                               for k, v in sorted(acc["by_length"].items())],
                   digit_similarity=[dict(method=k[0], context_tokens=k[1], digit_similarity=v)
                                     for k, v in sorted(acc["digits"].items())],
                   answers=answers, full_from=None if full_from is None else str(full_from))
    out = bench.write(BENCHMARK, payload, markdown)
    _plots(bench, s, methods, acc, out)
    return markdown


def reused_full_answers(bench: Bench, s: Settings, path: Path, cases: list[dict]) -> dict[tuple, str]:
    """Full attention's generated text for ``cases`` (by case key) from an earlier result file of this benchmark
    (``--full-from``); cases the file lacks are absent from the result and are run.

    Raises:
        ValueError: the file is not a retrieval result, was made with another model folder, hardware, dtype,
            device, threads, seed, ``max_new_tokens`` or torch / transformers version, or holds a case of the same
            key with another pass key or depth (drawn differently).
    """
    data = earlier_result(path, BENCHMARK, bench.header(), dict(max_new_tokens=s.max_new_tokens), holds="answers")
    rows = {tuple(a["case"]): a for a in data["answers"] if a.get("method") == "full"}
    out = {}
    for c in cases:
        row = rows.get(tuple(c["key"]))
        if row is None:
            continue
        depth = json.loads(json.dumps(c["depth_actual"]))  # as the file stores it
        if row["answer"] != c["answer"] or row["depth"] != depth:
            raise ValueError(f"--full-from {path}: case {c['key']} holds key {row['answer']!r} at depth "
                             f"{row['depth']!r} there, {c['answer']!r} at {depth!r} here: its cases were drawn "
                             "differently")
        out[tuple(c["key"])] = row["generated"]
    return out


def _answer(bench: Bench, m: Method, case: dict, ids: list[int]) -> dict:
    return _answer_from_text(bench, m, case, bench.tokenizer.decode(ids))  # special tokens kept visible


def _answer_from_text(bench: Bench, m: Method, case: dict, text: str) -> dict:
    digits = digit_similarity(text, case["answer"]) if case["task"] == "passkey" else None  # pass keys: all digits
    return dict(method=m.name, compression=m.ratio, task=case["task"], context_tokens=case["length"],
                cell=case["cell"], depth=case["depth_actual"], case=case["key"], answer=case["answer"],
                generated=text, correct=score_answer(text, case["answer"]), digit_similarity=digits)


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs)


def _accuracy(answers: list[dict]) -> dict:
    """``by_length[(method, task, length)]``, ``by_cell[(method, length, depth index)]`` (pass key) and
    ``digits[(method, length)]`` (the pass keys' mean digit similarity)."""
    groups: dict[str, dict] = {"by_length": {}, "by_cell": {}, "digits": {}}
    for a in answers:
        groups["by_length"].setdefault((a["method"], a["task"], a["context_tokens"]), []).append(a["correct"])
        if a["task"] == "passkey":
            groups["by_cell"].setdefault((a["method"], a["context_tokens"], a["cell"]), []).append(a["correct"])
            groups["digits"].setdefault((a["method"], a["context_tokens"]), []).append(a["digit_similarity"])
    return {k: {key: _mean(v) for key, v in g.items()} for k, g in groups.items()}


def _tables(bench: Bench, s: Settings, methods: list[str], acc: dict) -> str:
    head = [f"{report.tokens(n)}{'' if bench.fits(n) else '*'}" for n in s.lengths]
    tables = []
    for task in ("passkey", "multikey"):
        rows = [[m, *[acc["by_length"].get((m, task, n)) for n in s.lengths]] for m in methods]
        tables.append(report.markdown_table(["method", *head], rows))
    digits = report.markdown_table(["method", *head], [[m, *[acc["digits"].get((m, n)) for n in s.lengths]]
                                                        for m in methods])
    depth = ", ".join(f"{d:g}" for d in s.depths)
    full_from = getattr(bench.args, "full_from", None)
    reused = "" if full_from is None else f"- full attention's answers taken from `{full_from}` (`--full-from`)\n"
    return (f"# Retrieval ({bench.args.mode})\n\n{bench.describe()}{reused}"
            f"- pass key: {len(s.depths)} depths ({depth}) x {s.cases} case(s) per length; multi-key: "
            f"{s.n_keys} keys, {s.multikey_cases} case(s) per length; greedy, {s.max_new_tokens} new tokens\n\n"
            f"## Pass-key accuracy (mean over depths; * = beyond native positions; per depth: "
            f"`{bench.stem}_passkey_heatmap.png`)\n\n{tables[0]}\n"
            f"## Pass-key digit similarity (partial credit: 1 - edit distance of the answer's first digit run to the "
            f"key / key length; 1 = exact)\n\n{digits}\n## Multi-key accuracy\n\n"
            + (tables[1] if s.multikey_cases else "Not run (`--multikey-cases 0`).\n"))


def _plots(bench: Bench, s: Settings, methods: list[str], acc: dict, out: Path) -> None:
    grids = {m: [[acc["by_cell"].get((m, n, di)) for n in s.lengths] for di in range(len(s.depths))] for m in methods}
    report.heatmaps(out / f"{bench.stem}_passkey_heatmap.png", grids,
                    xticks=[report.tokens(n) for n in s.lengths], yticks=[f"{d:g}" for d in s.depths],
                    xlabel="context tokens", ylabel="depth",
                    title=f"{bench.model_name}: pass-key accuracy (grey: not run)")
    if not s.multikey_cases:  # no multi-key cases: no empty plot
        return
    report.line_plot(out / f"{bench.stem}_multikey.png",
                     {m: (s.lengths, [acc["by_length"].get((m, "multikey", n)) for n in s.lengths]) for m in methods},
                     xlabel="context tokens", ylabel="accuracy", title=f"{bench.model_name}: multi-key accuracy")


def settings_from(args: argparse.Namespace) -> Settings:
    """The mode's settings with the command line's, checked before the model loads."""
    s = with_overrides(SETTINGS[args.mode], lengths=args.lengths, cases=args.cases,
                       multikey_cases=args.multikey_cases, depths=None if args.depths is None else tuple(args.depths))
    if any(not 0 <= d <= 1 for d in s.depths):
        raise SystemExit(f"--depths {list(s.depths)}: allowed fractions in [0, 1]")
    if s.cases < 1:
        raise SystemExit(f"--cases {s.cases}: pass-key cases per (length, depth); allowed >= 1")
    if args.full_from is not None and not args.full_from.is_file():
        raise SystemExit(f"--full-from {args.full_from}: no such file (an earlier retrieval result .json)")
    if s.multikey_cases < 0:
        raise SystemExit(f"--multikey-cases {s.multikey_cases}: allowed >= 0 (0: no multi-key cases)")
    return s


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (tokens)")
    parser.add_argument("--cases", type=int, help="pass-key cases per (length, depth)")
    parser.add_argument("--depths", type=float, nargs="+",
                        help="pass-key depths, fractions of the context (default 0 0.25 0.5 0.75 1)")
    parser.add_argument("--multikey-cases", type=int, help="multi-key cases per length")
    parser.add_argument("--full-only", action="store_true",
                        help="full attention alone (no beacon adapter, no kvpress press): the base model's own "
                        "retrieval, e.g. to compare base models")
    parser.add_argument("--full-from", type=Path, default=None, metavar="RESULT.json",
                        help="take full attention's answers from this earlier retrieval result (same model, dtype, "
                        "device, threads, seed and versions; checked) instead of running it again")


def main(argv=None) -> int:
    return runner_main(argv, __doc__.splitlines()[0], add_args, settings_from, run)


if __name__ == "__main__":
    raise SystemExit(main())
