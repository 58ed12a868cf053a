"""Held-out retrieval: needles of four kinds, phrased unlike any training row, in two corpora, scored by depth.

The pass-key grid (``run.py``) asks in the paper's phrasing, which the read-back stage trains on; an adapter can learn
that phrasing instead of keeping what a window said. Here every case states one fact and asks for it in phrasings
no training row may use (`beacon_peft.eval_facts`, held-out split, enforced by `eval_facts.check_training_fact`):

* kinds: a 4-7 digit number, a person's name, a date, a short code (``QXT-482``), rotating over depths and lengths;
* haystacks (`eval_haystacks`): the held-out Paul Graham essays (never trained on) and CPython's pydoc topics
  (documentation prose; the read-back stage reads it as plain training text, but never with these needles),
  alternating over depths;
* the context: an intro unlike the training intros, the haystack with the needle at each depth (snapped to a
  sentence end; ``context_tokens`` exactly), then the question and its answer lead-in;
* greedy answers of ``max_new_tokens``, scored (`beacon_peft.eval_facts`): **exact** when the first value of the
  kind written (the first number, name, date or code) equals the fact's; **in place** the share of the value's
  characters (a number's digits) at their place in it; **leak** when the answer holds text of a training template
  that the case's own needle and question do not (``"Remember it"``); **compressed**: the needle lay in a compressed
  window when the answer was read (else the answer may come from raw tokens of the open window).

Full attention (adapter disabled) runs where context, question and answer fit the native positions; every beacon
adapter at every ``--ratios`` beside it (``--methods`` keeps some). One command, CPU-sized by default:

    python -m benchmarks.retrieval.heldout --adapter v3=adapters/smollm2-135m-beacon --with-untrained \\
        --ratios 8 2 --threads 1 --tag heldout-2k-8k
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from tqdm.auto import tqdm

from beacon_peft import eval_facts
from beacon_peft.facts import needle_compressed
from beacon_peft.needles import make_fact_case
from beacon_peft.training import phrasings
from benchmarks.common import measure, report
from benchmarks.common.harness import Bench, Method, runner_main, with_overrides

BENCHMARK = "retrieval"
CORPORA = ("essays", "pydoc")


@dataclass
class Settings:
    lengths: list[int]
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cases: int = 1  # cases per (length, depth) cell
    split: str = "held_out"
    max_new_tokens: int = 16


SETTINGS = {
    # 8,100 context tokens: question, lead-in and answer still fit SmolLM2's 8,192 positions (full attention)
    "quick": Settings([2048, 4096, 8100]),
    "long": Settings([16384, 32768]),
    "full": Settings([2048, 4096, 8100, 16384, 32768], cases=4),
}


def eval_haystacks() -> dict[str, str]:
    """The evaluation's haystack texts by `CORPORA` name: the held-out essays and the pydoc topics."""
    from beacon_peft.offline.corpora import ESSAY_SEPARATOR, essay_split, extra_corpora

    _, held_out = essay_split()
    texts = {"essays": "".join(text + ESSAY_SEPARATOR for _, text in held_out)}
    texts |= {"pydoc": text for name, text in extra_corpora() if name == "pydoc_data/topics"}  # noqa: B035
    missing = set(CORPORA) - set(texts)
    if missing:
        raise RuntimeError(f"haystack corpora {sorted(missing)} unavailable (pydoc_data is part of CPython)")
    return texts


def case_plan(s: Settings, seed: int) -> list[dict]:
    """What each case is, before any tokenizer: ``length``, ``cell`` (depth index), ``case`` (index in the cell),
    ``kind``, ``corpus``, ``seed`` and the ``fact`` (`eval_facts.eval_fact` of the settings' split). Kinds rotate
    over depths, cases and lengths, corpora over depths and cases, so every kind and corpus is met at every
    length once there are enough cells."""
    plan = []
    for li, length in enumerate(s.lengths):
        for di, depth in enumerate(s.depths):
            for c in range(s.cases):
                case_seed = seed * 1_000_003 + length * 31 + di * 7 + c
                kind = eval_facts.KINDS[(li + di + c) % len(eval_facts.KINDS)]
                fact = eval_facts.eval_fact(random.Random(case_seed), kind, s.split)
                plan.append(dict(length=length, cell=di, depth=depth, case=c, kind=kind, seed=case_seed,
                                 corpus=CORPORA[(di + c) % len(CORPORA)], fact=fact))
    return plan


def make_cases(bench: Bench, s: Settings) -> list[dict]:
    """Every case of `case_plan` as token ids (`beacon_peft.needles.make_fact_case`), haystacks cycled from a
    seeded offset."""
    texts = eval_haystacks()
    hay = {name: list(bench.tokenizer(texts[name], add_special_tokens=False)["input_ids"]) for name in CORPORA}
    cases = []
    for p in case_plan(s, bench.args.seed):
        ids = hay[p["corpus"]]
        case = make_fact_case(ids, bench.tokenizer, p["length"], p["depth"], p["fact"], intro=eval_facts.EVAL_INTRO,
                              filler_offset=random.Random(p["seed"]).randrange(len(ids)))
        cases.append({**p, **case, "key": [p["length"], p["cell"], p["case"]]})
    return cases


def score(generated: str, case: dict, fragments: list[str]) -> dict:
    """The scores of one generated answer (module docstring): ``extracted``, ``exact``, ``in_place`` (share of
    the value's characters), ``leak`` (the leaked fragment or None)."""
    fact = case["fact"]
    extracted = eval_facts.extract_answer(generated, case["kind"])
    own = " ".join((fact.needle, fact.question, fact.lead))
    return dict(extracted=extracted, exact=extracted == fact.value,
                in_place=eval_facts.units_in_place(extracted, fact.value) / len(fact.value),
                leak=eval_facts.template_leak(generated, own, fragments))


def run(bench: Bench, s: Settings) -> str:
    """Measure, write results/<tag>.{json,md} and <tag>_heatmap.png, add summary records; returns the markdown."""
    cases = make_cases(bench, s)
    methods = [m for m in [Method("full", "full"), *bench.beacon_methods(bench.ratios)]
               if not bench.args.methods or m.name in bench.args.methods]
    if bench.args.methods and len(methods) < len(set(bench.args.methods)):
        known = [m.name for m in [Method("full", "full"), *bench.beacon_methods(bench.ratios)]]
        raise SystemExit(f"--methods {bench.args.methods}: allowed names {known}")
    pad = bench.tokenizer.pad_token_id if bench.tokenizer.pad_token_id is not None else bench.tokenizer.eos_token_id
    fragments = eval_facts.template_fragments(phrasings.training_phrasings(evaluation=False))
    # length by length, each case by every method in turn: a run stopped early holds like-for-like answers
    todo = [(m, c) for c in cases for m in methods
            if m.kind != "full" or bench.fits(len(c["context_ids"]) + len(c["question_ids"]) + s.max_new_tokens)]
    answers = _earlier_answers(bench.args.from_json, s) if bench.args.from_json else []
    by_key = {(c["length"], c["cell"], c["case"]): c for c in cases}
    if any(by_key.get((a["context_tokens"], a["cell"], a["case"]), {}).get("answer") != a["value"] for a in answers):
        raise SystemExit(f"--from-json {bench.args.from_json}: its cases hold other values (another seed?)")
    # kept answers are scored again by this code (the scores follow the scoring, not the file)
    answers = [{**a, **score(a["generated"], by_key[(a["context_tokens"], a["cell"], a["case"])], fragments)}
               for a in answers if a["method"] in {m.name for m in methods}]
    done = {(a["method"], a["context_tokens"], a["cell"], a["case"]) for a in answers}
    todo = [] if bench.args.no_run else [(m, c) for m, c in todo
                                         if (m.name, c["length"], c["cell"], c["case"]) not in done]
    for m, c in tqdm(todo, desc="held-out retrieval", unit="case"):
        with bench.use(m) as model:
            ids = measure.greedy(model, c["context_ids"] + c["question_ids"], s.max_new_tokens, pad, bench.device)
        text = bench.tokenizer.decode(ids)
        compressed = None
        if m.kind == "beacon":
            config = bench.model.peft_config[m.adapter]
            compressed = needle_compressed(c, len(c["context_ids"]) + len(c["question_ids"]), config.window,
                                           config.stride)
        answers.append(dict(method=m.name, compression=m.ratio, context_tokens=c["length"], cell=c["cell"],
                            case=c["case"], depth=c["depth_actual"], kind=c["kind"], corpus=c["corpus"],
                            value=c["answer"], needle=c["fact"].needle, question=c["fact"].asked.strip(),
                            generated=text, compressed=compressed, **score(text, c, fragments)))
        # every answer so far, in case the run is stopped: the final write below replaces it (complete: true)
        bench.write(BENCHMARK, dict(settings=vars(s), answers=answers, complete=False), "(incomplete: see the json)\n")
    names = list(dict.fromkeys(a["method"] for a in answers))
    by_method = {m.name: m for m in methods}
    for (name, length), rows in _groups(answers, "method", "context_tokens").items():
        bench.record(BENCHMARK, by_method[name], length, "heldout_exact", _share(rows, "exact"))
        bench.record(BENCHMARK, by_method[name], length, "heldout_in_place", _mean(rows, "in_place"))
        bench.record(BENCHMARK, by_method[name], length, "heldout_leak", _share(rows, "leak"))
    missing = _missing(bench, s, methods, cases, answers)
    markdown = tables(bench, s, names, answers, missing)
    out = bench.write(BENCHMARK, dict(settings=vars(s), answers=answers, complete=not missing), markdown)
    grids = {m: [[_cell(answers, m, n, di) for n in s.lengths] for di in range(len(s.depths))] for m in names}
    report.heatmaps(out / f"{bench.stem}_heatmap.png", grids, xticks=[report.tokens(n) for n in s.lengths],
                    yticks=[f"{d:g}" for d in s.depths], xlabel="context tokens", ylabel="depth",
                    title=f"{bench.model_name}: held-out needles, exact answers (grey: not run)")
    return markdown


def _missing(bench: Bench, s: Settings, methods: list, cases: list[dict], answers: list[dict]) -> int:
    """How many (method, case) pairs the run would answer that ``answers`` lack."""
    have = {(a["method"], a["context_tokens"], a["cell"], a["case"]) for a in answers}
    return sum((m.name, c["length"], c["cell"], c["case"]) not in have for c in cases for m in methods
               if m.kind != "full" or bench.fits(len(c["context_ids"]) + len(c["question_ids"]) + s.max_new_tokens))


def _earlier_answers(path, s: Settings) -> list[dict]:
    """The answers of an earlier (possibly stopped) run's json (``--from-json``), checked to be of these settings:
    its cases are not run again."""
    import json

    data = json.loads(open(path).read())
    if data.get("settings", {}).get("split") != s.split or data["settings"].get("max_new_tokens") != s.max_new_tokens:
        raise SystemExit(f"--from-json {path}: made with other settings ({data.get('settings')})")
    return [{"case": 0, **a} for a in data["answers"]  # files of before 2026-12-08 02:00 ran one case per cell
            if a["context_tokens"] in s.lengths and a["cell"] < len(s.depths)]


def _groups(answers: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for a in answers:
        out.setdefault(tuple(a[k] for k in keys), []).append(a)
    return out


def _share(rows: list[dict], field: str) -> float:
    return sum(bool(r[field]) for r in rows) / len(rows)


def _mean(rows: list[dict], field: str) -> float:
    return sum(r[field] for r in rows) / len(rows)


def _cell(answers: list[dict], method: str, length: int, cell: int) -> float | None:
    rows = [a for a in answers if a["method"] == method and a["context_tokens"] == length and a["cell"] == cell]
    return _share(rows, "exact") if rows else None


def _count(rows: list[dict], field: str) -> str:
    return f"{sum(bool(r[field]) for r in rows)}/{len(rows)}" if rows else "-"


def tables(bench: Bench, s: Settings, names: list[str], answers: list[dict], missing: int = 0) -> str:
    """The result's markdown: exact / in place / leaks by length, exact by depth, by kind, every answer."""
    by = _groups(answers, "method", "context_tokens")
    head = [report.tokens(n) for n in s.lengths]
    exact = report.markdown_table(["method", *head], [[m, *[_count(by.get((m, n), []), "exact") for n in s.lengths]]
                                                      for m in names])
    place = report.markdown_table(["method", *head], [[m, *[_mean(by[(m, n)], "in_place") if (m, n) in by else None
                                                            for n in s.lengths]] for m in names])
    leaks = report.markdown_table(["method", *head], [[m, *[_count(by.get((m, n), []), "leak") for n in s.lengths]]
                                                      for m in names])
    compressed = report.markdown_table(
        ["method", *head], [[m, *[_count([a for a in by.get((m, n), []) if a["compressed"]], "exact")
                                  for n in s.lengths]] for m in names if not m == "full"])
    depth_rows = []
    for m in names:
        for n in s.lengths:
            rows = by.get((m, n), [])
            if rows:
                depth_rows.append([m, report.tokens(n), *[_count([a for a in rows if a["cell"] == di], "exact")
                                                          for di in range(len(s.depths))]])
    depths = report.markdown_table(["method", "length", *[f"{d:g}" for d in s.depths]], depth_rows)
    kinds = _groups(answers, "method", "kind")
    kind_table = report.markdown_table(["method", *eval_facts.KINDS],
                                       [[m, *[_count(kinds.get((m, k), []), "exact") for k in eval_facts.KINDS]]
                                        for m in names])
    listing = report.markdown_table(
        ["method", "length", "depth", "kind", "corpus", "value", "answer"],
        [[a["method"], report.tokens(a["context_tokens"]), f"{s.depths[a['cell']]:g}", a["kind"], a["corpus"],
          a["value"], "`" + a["generated"].replace("\n", " ").replace("|", "/").replace("`", "'").strip() + "`"]
         for a in answers])
    return (f"# Held-out retrieval ({bench.stem})\n\n{bench.describe()}"
            f"- cases: {len(s.depths)} depths ({', '.join(f'{d:g}' for d in s.depths)}) x {s.cases} per length; "
            f"phrasings: `{s.split}` split of `beacon_peft.eval_facts` (never in a training row); kinds "
            f"{', '.join(eval_facts.KINDS)}; haystacks {', '.join(CORPORA)}; greedy, {s.max_new_tokens} new tokens; "
            "full attention only where the whole sequence fits the native positions\n"
            + (f"- **stopped early**: {missing} (method, case) answers missing; the counts below say of how many "
               "cases each is\n" if missing else "") + "\n"
            f"## Exact answers (the first value of the kind written equals the fact's; per depth: "
            f"`{bench.stem}_heatmap.png`)\n\n{exact}\n"
            "## Characters in place (a number's digits; mean share of the value)\n\n"
            f"{place}\n## Answers that leak a training template\n\n{leaks}\n"
            "## Exact, needle in a compressed window only (exact / such cases)\n\n"
            f"{compressed}\n## Exact by depth\n\n{depths}\n## Exact by kind (all lengths)\n\n{kind_table}\n"
            f"## Every answer\n\n{listing}")


def settings_from(args: argparse.Namespace) -> Settings:
    """The mode's settings with the command line's, checked before the model loads."""
    s = with_overrides(SETTINGS[args.mode], lengths=args.lengths, cases=args.cases, split=args.split,
                       depths=tuple(args.depths) if args.depths else None, max_new_tokens=args.max_new_tokens)
    if s.cases < 1:
        raise SystemExit(f"--cases {s.cases}: cases per (length, depth); allowed >= 1")
    if any(not 0 <= d <= 1 for d in s.depths):
        raise SystemExit(f"--depths {list(s.depths)}: allowed values in [0, 1]")
    if s.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens {s.max_new_tokens}: allowed >= 1")
    return s


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (tokens)")
    parser.add_argument("--cases", type=int, help="cases per (length, depth)")
    parser.add_argument("--depths", type=float, nargs="+", help="needle depths in [0, 1] (default 0 .25 .5 .75 1)")
    parser.add_argument("--split", choices=eval_facts.SPLITS, default=None,
                        help="phrasings: held_out (default; never trained on) or train (the evaluation's other part)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer length (default 16)")
    parser.add_argument("--from-json", default=None, metavar="RESULT.json",
                        help="keep the answers of an earlier (e.g. stopped) run of the same settings and run only the "
                        "cases it lacks (its file may be this run's own: it is rewritten)")
    parser.add_argument("--no-run", action="store_true",
                        help="with --from-json: run no case, only write the tables and heatmap of the kept answers "
                        "(a stopped run's: the markdown says how many are missing)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods (e.g. full v3-r8 beacon-untrained-r8)")


def main(argv=None) -> int:
    return runner_main(argv, __doc__.splitlines()[0], add_args, settings_from, run)


if __name__ == "__main__":
    raise SystemExit(main())
