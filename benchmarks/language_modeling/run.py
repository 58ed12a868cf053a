"""Language modelling: perplexity of the last ``tail`` tokens of held-out essays given everything before them.

For a sequence of N tokens (``context_tokens`` = N, the scored tail included) every method predicts the same
last T = 256 tokens: full attention and beacon adapters in one forward (``logits_to_keep = T + 1``), kvpress
presses by compressing the first N - T tokens and scoring the tail through the compressed cache (the
worker's ``tail_nll``). The tail is the same text at every length (the context grows backwards), so the
curves show what extra context buys. Two sweeps: N over ``lengths`` at ``--ratios``, and the ratio over
``sweep_ratios`` at ``sweep_length``. Full attention and kvpress only run where N fits the model's native
positions; beacons run at every length.

    python -m benchmarks.language_modeling.run --quick      # or --full (GPU), --lengths 1024 4096 ...
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from beacon_peft.metrics import tail_nll
from benchmarks.common import metrics, report
from benchmarks.common.harness import Bench, Method, runner_main, with_overrides

BENCHMARK = "language_modeling"


@dataclass
class Settings:
    lengths: list[int]
    sweep_length: int
    sweep_ratios: list[int]
    tail: int = 256
    samples: int = 1  # sequences per length (different held-out text)
    spread: int = 20000  # sample ends are drawn from [max length, max length + spread) of the held-out stream


SETTINGS = {
    "quick": Settings([1024, 2048, 4096], 2048, [4, 8, 16]),
    "full": Settings([1024, 2048, 4096, 8192, 16384, 32768], 8192, [2, 4, 8, 16, 32], samples=4),
    "long": Settings([4096, 8192, 16384, 32768], 8192, [2, 4, 8, 16]),
}


def sequences(bench: Bench, s: Settings) -> dict[int, list[list[int]]]:
    """``samples`` sequences per length; sample k of every length ends at the same place of the stream."""
    from beacon_peft.offline.corpora import haystack_ids

    longest = max(s.lengths + [s.sweep_length])
    rng = random.Random(bench.args.seed)
    ends = [rng.randrange(longest, longest + s.spread) for _ in range(s.samples)]
    stream = haystack_ids(bench.tokenizer, max(ends), "held_out")
    return {n: [stream[e - n : e] for e in ends] for n in sorted(set(s.lengths + [s.sweep_length]))}


def plan(bench: Bench, s: Settings) -> dict[int, list[Method]]:
    """Methods to run at each length."""
    full = Method("full", "full")
    out = {}
    for n in sorted(set(s.lengths + [s.sweep_length])):
        ratios = (list(bench.ratios) if n in s.lengths else []) + (s.sweep_ratios if n == s.sweep_length else [])
        ratios = sorted(set(ratios))
        fits = bench.fits(n)
        out[n] = ([full] if fits else []) + bench.beacon_methods(ratios) + (bench.press_methods(ratios) if fits else [])
    return out


def run(bench: Bench, s: Settings) -> str:
    """Measure, write results/<mode>.{json,md,png}, add summary records; returns the markdown."""
    seqs, todo = sequences(bench, s), plan(bench, s)
    nll: dict[tuple[str, int], list[float]] = {}  # (method, N) -> [sum_nll, count]
    local = [(n, m) for n, ms in todo.items() for m in ms if m.kind != "kvpress"]
    bar = tqdm(total=len(local) * s.samples, desc="language modeling", unit="seq")
    for n, m in local:
        with bench.use(m) as model:
            for ids in seqs[n]:
                total, count = tail_nll(model, ids, s.tail, bench.device)
                acc = nll.setdefault((m.name, n), [0.0, 0])
                acc[0] += total
                acc[1] += count
                bar.update()
    bar.close()
    _kvpress(bench, s, seqs, todo, nll)

    ppl = {key: metrics.perplexity(t, c) for key, (t, c) in nll.items()}
    methods = {m.name: m for ms in todo.values() for m in ms}
    for (name, n), value in sorted(ppl.items()):
        bench.record(BENCHMARK, methods[name], n, "perplexity", value)
    markdown = _tables(bench, s, todo, ppl)
    out = bench.write(BENCHMARK, dict(settings=vars(s), perplexity=[
        dict(method=name, compression=methods[name].ratio, context_tokens=n, perplexity=v,
             sum_nll=nll[(name, n)][0], count=nll[(name, n)][1]) for (name, n), v in sorted(ppl.items())]), markdown)
    _plots(bench, s, todo, ppl, out)
    return markdown


def _kvpress(bench: Bench, s: Settings, seqs, todo, nll) -> None:
    measurements = []
    for n, ms in todo.items():
        presses = [dict(name=m.press, compression_ratio=m.compression_ratio) for m in ms if m.kind == "kvpress"]
        if presses:
            measurements += [dict(kind="tail_nll", id=[n, k], context_ids=ids[: -s.tail], tail_ids=ids[-s.tail:],
                                  presses=presses) for k, ids in enumerate(seqs[n])]
    result = bench.kvpress(measurements)
    if result is None:
        return
    by_key = {(m.press, m.compression_ratio): m for ms in todo.values() for m in ms if m.kind == "kvpress"}
    for meas in result["measurements"]:
        n = meas["id"][0]
        for r in meas["results"]:
            m = by_key[(r["press"], r["compression_ratio"])]
            acc = nll.setdefault((m.name, n), [0.0, 0])
            acc[0] += r["sum_nll"]
            acc[1] += r["count"]


def _length_methods(bench: Bench, lengths: list[int], todo) -> list[str]:
    """Methods of the length sweep (full, and every method at ``--ratios``), in run order."""
    return list(dict.fromkeys(m.name for n in lengths for m in todo[n] if m.kind == "full" or m.ratio in bench.ratios))


def _tables(bench: Bench, s: Settings, todo, ppl) -> str:
    lengths = sorted(s.lengths)
    rows_by_len = _length_methods(bench, lengths, todo)
    head = [f"{report.tokens(n)}{'' if bench.fits(n) else '*'}" for n in lengths]
    table1 = report.markdown_table(["method", *head], [[m, *[ppl.get((m, n)) for n in lengths]] for m in rows_by_len])
    sweep = [m for m in todo[s.sweep_length]]
    families = list(dict.fromkeys(m.family for m in sweep))
    ratios = sorted({m.ratio for m in sweep if m.kind != "full"})
    cell = {(m.family, m.ratio): ppl.get((m.name, s.sweep_length)) for m in sweep}
    table2 = report.markdown_table(["method", *[f"r={r}" for r in ratios]],
                                   [[f, *[cell.get((f, r)) for r in ratios]] if f != "full" else
                                    [f, *[cell.get(("full", 1))] * len(ratios)] for f in families])
    return (f"# Language modelling ({bench.args.mode})\n\n{bench.describe()}"
            f"- metric: perplexity of the last {s.tail} tokens of held-out essays given the preceding context; "
            f"{s.samples} sequence(s) per length, pooled\n\n"
            f"## Perplexity vs context length (tokens incl. the scored tail; * = beyond native positions)\n\n"
            f"{table1}\n## Perplexity vs compression ratio at {report.tokens(s.sweep_length)} tokens "
            f"(full attention repeated for reference)\n\n{table2}")


def _plots(bench: Bench, s: Settings, todo, ppl, out: Path) -> None:
    lengths = sorted(s.lengths)
    names = _length_methods(bench, lengths, todo)
    report.line_plot(out / f"{bench.stem}_ppl_vs_length.png",
                     {m: (lengths, [ppl.get((m, n)) for n in lengths]) for m in names},
                     xlabel="context tokens", ylabel=f"perplexity of the last {s.tail} tokens", logy=True,
                     title=f"{bench.model_name}: perplexity vs context (native {bench.native_positions})")
    sweep = todo[s.sweep_length]
    ratios = sorted({m.ratio for m in sweep if m.kind != "full"})
    series = {}
    for m in sweep:
        xs, ys = series.setdefault(m.family, ([], []))
        for r in (ratios if m.kind == "full" else [m.ratio]):
            xs.append(r)
            ys.append(ppl.get((m.name, s.sweep_length)))
    report.line_plot(out / f"{bench.stem}_ppl_vs_ratio.png", series, xlabel="compression ratio (KV budget 1/r)",
                     ylabel=f"perplexity of the last {s.tail} tokens", logy=True,
                     title=f"{bench.model_name}: perplexity vs ratio at {report.tokens(s.sweep_length)} tokens")


def settings_from(args: argparse.Namespace) -> Settings:
    if args.sweep_ratios is not None and (not args.sweep_ratios or min(args.sweep_ratios) < 1):
        raise ValueError(f"--sweep-ratios {args.sweep_ratios}: allowed one or more integers >= 1")
    return with_overrides(SETTINGS[args.mode], lengths=args.lengths, samples=args.samples, tail=args.tail,
                          sweep_length=args.sweep_length,
                          sweep_ratios=None if args.sweep_ratios is None else sorted(set(args.sweep_ratios)))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (tokens, tail included)")
    parser.add_argument("--samples", type=int, help="sequences per length")
    parser.add_argument("--tail", type=int, help="scored tail tokens (default 256)")
    parser.add_argument("--sweep-length", type=int, help="sequence length of the ratio sweep")
    parser.add_argument("--sweep-ratios", type=int, nargs="*",
                        help="ratios of the sweep (default: the mode's; each adapter runs those it supports)")


def main(argv=None) -> int:
    return runner_main(argv, __doc__.splitlines()[0], add_args, settings_from, run,
                       extra_ratios=lambda s: s.sweep_ratios)


if __name__ == "__main__":
    raise SystemExit(main())
