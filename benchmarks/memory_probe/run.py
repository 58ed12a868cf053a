"""Memory probe: how much of a compressed window the memory still holds, in nats, before accuracy moves.

Two measurements per method and context length, each the difference of two negative log-likelihoods (nats per
token), so they are near 0 when the memory holds nothing and they grow as it holds more:

- **key information** (``beacon_peft.metrics.key_information``): a pass-key case
  (``beacon_peft.needles.make_passkey_case``, held-out essays) is scored twice on the same answer, the key's tokens:
  once after its own context, once after the same context whose needle holds another key. ``other - own`` is what
  the context tells about the key (full attention: about 2.3 nats, the cost of a random digit). Beacon cases count
  only where the needle sits in a compressed window when the answer is read (``compressed`` in the json); with the
  needle in the open window the raw tokens answer directly.
- **context gain** (``beacon_peft.metrics.context_gain``): the last ``tail`` tokens of a held-out stretch are scored
  after the whole stretch and after only the token before them. ``alone - with`` is what the earlier context is
  worth to the prediction.

A trained adapter that retrieves has a key information close to full attention's; one that only condenses the
gist of a window has a context gain above 0 and a key information near 0. Full attention runs where the
sequence fits the native positions; the kvpress presses are not probed (their worker scores no answers).

    python -m benchmarks.memory_probe.run --quick --adapter shipped=adapters/smollm2-135m-beacon --with-untrained
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from beacon_peft.metrics import context_gain, key_information
from beacon_peft.needles import (
    INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    check_phrasing,
    needle_compressed,
    passkey_pair,
)
from benchmarks.common import report
from benchmarks.common.harness import (
    Bench,
    Method,
    earlier_result,
    runner_main,
    with_overrides,
)

BENCHMARK = "memory_probe"


@dataclass
class Settings:
    lengths: list[int]
    cases: int = 4  # pass-key cases (and text stretches) per length
    depths: tuple[float, float] = (0.05, 0.5)  # the needles' depths are spread over this range
    tail: int = 256  # tokens scored for the context gain
    needle: str = PASSKEY_NEEDLE  # the pass key's sentence, a template with {key}
    question: str = PASSKEY_QUESTION
    intro: str = INTRO  # the text before the filler ("" for none)


SETTINGS = {
    "quick": Settings([1024, 2048]),
    "full": Settings([1024, 4096, 16384, 65536], cases=8),
    "long": Settings([4096, 8150, 16384], cases=4),
}


def make_cases(bench: Bench, s: Settings) -> tuple[list[dict], dict[int, list[list[int]]]]:
    """Pass-key case pairs (own key, other key; same filler and depth) and text stretches per length."""
    from beacon_peft.offline.corpora import haystack_ids

    hay = haystack_ids(bench.tokenizer, max(s.lengths) + s.cases * 4096, "held_out")
    lo, hi = s.depths
    pairs, texts = [], {}
    for length in s.lengths:
        for c in range(s.cases):
            depth = lo + (hi - lo) * c / max(1, s.cases - 1)
            seed = bench.args.seed * 1_000_003 + length * 31 + c
            offset = random.Random(seed).randrange(len(hay))
            phrasing = dict(needle=s.needle, question=s.question, intro=s.intro, filler_offset=offset)
            pair = passkey_pair(hay, bench.tokenizer, length, depth, seed, seed + 7_919, **phrasing)
            if pair is None:
                continue  # keys of different token lengths move the filler: not a like-for-like pair
            own, other = pair
            pairs.append(dict(length=length, depth=own["depth_actual"], own=own, other=other,
                              answer_ids=bench.tokenizer.encode(" " + own["answer"], add_special_tokens=False)))
        texts[length] = [[hay[(c * 4096 + i) % len(hay)] for i in range(length)] for c in range(s.cases)]
    return pairs, texts


def run(bench: Bench, s: Settings) -> str:
    """Measure, write results/<mode>.{json,md} and the two plots, add summary records; returns the markdown."""
    pairs, texts = make_cases(bench, s)
    full = Method("full", "full")
    methods = [full] + bench.beacon_methods(bench.ratios)
    full_from = getattr(bench.args, "full_from", None)
    reused = reused_full_rows(bench, s, full_from, pairs) if full_from is not None else None
    rows = []  # one per (method, case)
    for m in methods:
        if m.kind == "full" and reused is not None:
            rows.extend(reused)
            continue
        config = bench.model.peft_config.get(m.adapter) if m.adapter else None
        for p in tqdm(pairs, desc=f"memory probe {m.name}", unit="case"):
            answer = p["answer_ids"]
            own_ids = p["own"]["context_ids"] + p["own"]["question_ids"]
            other_ids = p["other"]["context_ids"] + p["other"]["question_ids"]
            if m.kind == "full" and not bench.fits(len(own_ids) + len(answer)):
                continue
            compressed = config is not None and needle_compressed(p["own"], len(own_ids), config.window,
                                                                  config.stride)
            with bench.use(m) as model:
                key = key_information(model, own_ids, other_ids, answer, bench.device)
            rows.append(dict(method=m.name, kind="key", context_tokens=p["length"], depth=p["depth"],
                             answer=p["own"]["answer"], compressed=compressed, own_nll=key.own_nll,
                             other_nll=key.other_nll, key_information=key.information))
        for length, stretches in texts.items():
            if m.kind == "full" and not bench.fits(length):
                continue
            tail = min(s.tail, length // 2)
            with bench.use(m) as model:
                for ids in stretches:
                    gain = context_gain(model, ids, tail, bench.device)
                    rows.append(dict(method=m.name, kind="text", context_tokens=length, tail=tail,
                                     with_context_nll=gain.with_context_nll, alone_nll=gain.alone_nll,
                                     context_gain=gain.gain))

    table = summarize(rows)
    names = [m.name for m in methods]
    by_method = {m.name: m for m in methods}
    for (name, length), cell in sorted(table.items()):
        for metric in ("key_information", "context_gain"):
            if cell[metric] is not None:
                bench.record(BENCHMARK, by_method[name], length, f"{metric}_nats", cell[metric])
    markdown = _tables(bench, s, names, table)
    out = bench.write(BENCHMARK, dict(settings=vars(s), summary=[dict(method=k[0], context_tokens=k[1], **v)
                                                                  for k, v in sorted(table.items())],
                                      rows=rows, full_from=None if full_from is None else str(full_from)), markdown)
    for metric, label in (("key_information", "key information (nats/token)"),
                          ("context_gain", "context gain (nats/token)")):
        report.line_plot(out / f"{bench.stem}_{metric}.png",
                         {n: (s.lengths, [table.get((n, x), {}).get(metric) for x in s.lengths]) for n in names},
                         xlabel="context tokens", ylabel=label, title=f"{bench.model_name}: {label}")
    return markdown


def reused_full_rows(bench: Bench, s: Settings, path: Path, pairs: list[dict]) -> list[dict]:
    """Full attention's rows (key and text) from an earlier memory-probe result (``--full-from``), instead of
    scoring them again.

    Raises:
        ValueError: the file is not a memory-probe result, or was made with another model folder, hardware, dtype,
            device, threads, seed, torch / transformers version or other settings (lengths, cases, depths, tail,
            phrasing: they decide the haystack and the pairs), or its pairs hold other keys or depths (drawn
            differently).
    """
    settings = json.loads(json.dumps(vars(s)))  # as the file stores them (tuples as lists)
    data = earlier_result(path, BENCHMARK, bench.header(), settings, holds="rows")
    full = [r for r in data["rows"] if r.get("method") == "full"]
    stored = [(r["context_tokens"], r["answer"], r["depth"]) for r in full if r.get("kind") == "key"]
    here = [(p["length"], p["own"]["answer"], json.loads(json.dumps(p["depth"]))) for p in pairs
            if bench.fits(len(p["own"]["context_ids"]) + len(p["own"]["question_ids"]) + len(p["answer_ids"]))]
    if stored != here:
        raise ValueError(f"--full-from {path}: its full-attention pairs (length, key, depth) are {stored[:3]}..., "
                         f"here {here[:3]}...: its cases were drawn differently")
    return full


def summarize(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (method, length): mean key information over the cases whose needle was compressed (all cases for
    full attention), their count, and the mean context gain. A metric with no case is None."""
    table: dict[tuple[str, int], dict] = {}
    for r in rows:
        cell = table.setdefault((r["method"], r["context_tokens"]), dict(key=[], text=[]))
        if r["kind"] == "key" and (r["compressed"] or r["method"] == "full"):
            cell["key"].append(r["key_information"])
        elif r["kind"] == "text":
            cell["text"].append(r["context_gain"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {k: dict(key_information=mean(v["key"]), key_cases=len(v["key"]), context_gain=mean(v["text"]))
            for k, v in table.items()}


def _tables(bench: Bench, s: Settings, names: list[str], table: dict) -> str:
    head = ["method", *[f"{report.tokens(n)}{'' if bench.fits(n) else '*'}" for n in s.lengths]]

    def cell(name, n, metric):
        v = table.get((name, n), {})
        if v.get(metric) is None:
            return None
        return f"{v[metric]:.3f}" + (f" ({v['key_cases']})" if metric == "key_information" else "")

    key = report.markdown_table(head, [[m, *[cell(m, n, "key_information") for n in s.lengths]] for m in names])
    gain = report.markdown_table(head, [[m, *[cell(m, n, "context_gain") for n in s.lengths]] for m in names])
    lo, hi = s.depths
    phrasing = "" if (s.needle, s.question, s.intro) == (PASSKEY_NEEDLE, PASSKEY_QUESTION, INTRO) else (
        f"- phrasing (not the pass-key benchmark's): needle {s.needle!r}, question {s.question!r}, "
        f"intro {s.intro!r}\n")
    full_from = getattr(bench.args, "full_from", None)
    if full_from is not None:
        phrasing += f"- full attention's rows taken from `{full_from}` (`--full-from`)\n"
    return (f"# Memory probe ({bench.args.mode})\n\n{bench.describe()}"
            f"- {s.cases} pass-key pairs per length, needles at depths {lo:g}..{hi:g}; context gain on the last "
            f"{s.tail} tokens (half the length if shorter) of {s.cases} held-out stretches\n{phrasing}\n"
            f"## Key information: answer NLL after another key minus after its own (nats/token; in brackets the "
            f"cases whose needle was compressed; * = beyond native positions)\n\n{key}\n"
            f"## Context gain: NLL of the tail alone minus after the whole stretch (nats/token)\n\n{gain}")


def settings_from(args: argparse.Namespace) -> Settings:
    """The mode's settings with the command line's; the phrasing is checked here, before the model loads."""
    s = with_overrides(SETTINGS[args.mode], lengths=args.lengths, cases=args.cases, tail=args.tail,
                       needle=args.needle, question=args.question, intro=args.intro)
    check_phrasing(s.needle, s.question)
    if args.full_from is not None and not args.full_from.is_file():
        raise SystemExit(f"--full-from {args.full_from}: no such file (an earlier memory-probe result .json)")
    return s


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (tokens)")
    parser.add_argument("--cases", type=int, help="pass-key pairs and text stretches per length")
    parser.add_argument("--tail", type=int, help="tokens scored for the context gain")
    parser.add_argument("--needle", help="the pass key's sentence, a template with {key} (default: the pass-key "
                        "benchmark's); phrase it unlike training to check that the memory generalises")
    parser.add_argument("--question", help="the question after the context (its answer is the key)")
    parser.add_argument("--intro", help="text before the filler ('' for none; default: the pass-key intro)")
    parser.add_argument("--full-from", type=Path, default=None, metavar="RESULT.json",
                        help="take full attention's rows from this earlier memory-probe result (same model, dtype, "
                        "device, threads, seed, versions and settings; checked) instead of scoring them again")


def main(argv=None) -> int:
    return runner_main(argv, __doc__.splitlines()[0], add_args, settings_from, run)


if __name__ == "__main__":
    raise SystemExit(main())
