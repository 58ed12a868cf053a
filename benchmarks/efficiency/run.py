"""Efficiency: KV bytes held, prefill time, decode time per token and peak process memory vs context length.

Full attention and beacon adapters run in this process, alternately (every method once per repeat, per
length, after one warm-up each), and the minimum over ``repeats`` is kept, so their ratios hold on a noisy
machine. kvpress presses run in their worker on the same weights and context, with an unpressed run
(``full-kvpress-venv``, transformers 5.2 in that venv) as their own same-process reference. KV bytes are
summed over the tensors the cache really holds after the prefill; a beacon memory is checked against the
exact entry count and shown next to the usual estimate ``sink + N/r + window``. Peak RSS is the process
high-water mark from just before the prefill (weights included; Linux), the minimum over repeats. Full
attention and kvpress run where the context fits the native positions (the few decode steps may go past).

    python -m benchmarks.efficiency.run --quick     # or --full (GPU), --lengths 4096 8192 --no-kvpress ...
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from beacon_peft.metrics import kv_bytes_per_entry
from benchmarks.common import measure, report
from benchmarks.common.harness import Bench, Method, runner_main, with_overrides

BENCHMARK = "efficiency"
KVPRESS_FULL = Method("full-kvpress-venv", "kvpress", 1, press="none")
METRICS = ("kv_bytes", "prefill_s", "decode_s_per_token", "peak_rss_bytes", "peak_gpu_bytes")
MIB = 2**20


@dataclass
class Settings:
    lengths: list[int]
    n_decode: int = 8
    repeats: int = 2
    warmup_tokens: int = 256


SETTINGS = {
    "quick": Settings([1024, 2048, 4096]),
    "full": Settings([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], n_decode=32, repeats=3),
    "long": Settings([8192, 16384, 32768]),
}


def run(bench: Bench, s: Settings) -> str:
    """Measure, write results/<mode>.{json,md,png}, add summary records; returns the markdown."""
    from beacon_peft.offline.corpora import haystack_ids

    offset = random.Random(bench.args.seed).randrange(20000)
    contexts = {n: haystack_ids(bench.tokenizer, n, "held_out", offset=offset) for n in s.lengths}
    local = [Method("full", "full")] + bench.beacon_methods(bench.ratios)
    rows: dict[tuple[str, int], dict] = {}
    for m in local:  # warm-up: first calls pay one-off costs
        with bench.use(m) as model:
            measure.prefill_decode(model, contexts[s.lengths[0]][: s.warmup_tokens], 1, bench.device)
    todo = [(n, rep, m) for n in s.lengths for rep in range(s.repeats) for m in local
            if m.kind != "full" or bench.fits(n)]
    for n, _rep, m in tqdm(todo, desc="efficiency", unit="run"):
        with bench.use(m) as model:
            _keep_min(rows, m, n, measure.prefill_decode(model, contexts[n], s.n_decode, bench.device))
    presses = bench.press_methods(bench.ratios)
    jobs = [dict(kind="efficiency", id=[n, rep], context_ids=contexts[n], n_decode=s.n_decode,
                 presses=[dict(name="none", compression_ratio=0.0)] +
                 [dict(name=m.press, compression_ratio=m.compression_ratio) for m in presses])
            for n in s.lengths if bench.fits(n) for rep in range(s.repeats)] if presses else []
    result = bench.kvpress(jobs)
    if result is not None:
        by_press = {(m.press, m.compression_ratio): m for m in presses + [KVPRESS_FULL]}
        for meas in result["measurements"]:
            for r in meas["results"]:
                res = dict(r, kv_entries=r["kept_tokens"])
                _keep_min(rows, by_press[(r["press"], r["compression_ratio"])], meas["id"][0], res)

    methods = {m.name: m for m in local + presses + [KVPRESS_FULL]}
    table = [_row(bench, methods[name], n, r, rows) for (name, n), r in rows.items()]
    table.sort(key=lambda t: (t["context_tokens"], list(methods).index(t["method"])))
    for t in table:
        for metric in METRICS:
            if t.get(metric) is not None:
                bench.record(BENCHMARK, methods[t["method"]], t["context_tokens"], metric, t[metric])
    markdown = _tables(bench, s, table)
    out = bench.write(BENCHMARK, dict(settings=vars(s), bytes_per_entry=_per_entry(bench), rows=table), markdown)
    _plots(bench, s, table, out)
    return markdown


def _keep_min(rows: dict, m: Method, n: int, res: dict) -> None:
    """Fold one repeat into ``rows[(method, n)]``: minimum of times and peaks, KV must not change."""
    keep = rows.setdefault((m.name, n), dict(res))
    for key in ("prefill_s", "decode_s_per_token", "peak_rss_bytes", "peak_gpu_bytes"):
        if res.get(key) is not None:
            keep[key] = min(keep[key], res[key])
    if res["kv_bytes"] != keep["kv_bytes"]:
        raise RuntimeError(f"{m.name} at {n} tokens held {res['kv_bytes']} then {keep['kv_bytes']} KV bytes")


def _per_entry(bench: Bench) -> int:
    return kv_bytes_per_entry(bench.config, bench.dtype)


def _row(bench: Bench, m: Method, n: int, r: dict, rows: dict) -> dict:
    """One table row: measurements, expected entries and ratios to the same-process full attention."""
    if m.kind == "beacon":
        cfg = bench.model.peft_config[m.adapter]
        expected = measure.beacon_entries(n, cfg.window, m.ratio, cfg.sink_size)
        bound = measure.beacon_bound_entries(n, cfg.window, m.ratio, cfg.sink_size)
    else:  # full attention keeps every entry, a kvpress press int(n * (1 - compression_ratio)) of them
        expected, bound = int(n * (1 - m.compression_ratio)), None
    ref = rows.get(("full-kvpress-venv" if m.kind == "kvpress" else "full", n), {})
    ratio = {f"{k}_vs_full": (r[k] / ref[k] if ref.get(k) and r.get(k) is not None else None)
             for k in ("kv_bytes", "prefill_s", "decode_s_per_token")}
    return dict(method=m.name, compression=m.ratio, context_tokens=n, kv_entries=r["kv_entries"],
                kv_bytes=r["kv_bytes"], expected_entries=expected, bound_entries=bound,
                kv_bytes_vs_bound=r["kv_bytes"] / (bound * _per_entry(bench)) if bound else None,
                prefill_s=r["prefill_s"], decode_s_per_token=r["decode_s_per_token"],
                rss_before_bytes=r.get("rss_before_bytes"), peak_rss_bytes=r.get("peak_rss_bytes"),
                peak_gpu_bytes=r.get("peak_gpu_bytes"), **ratio)


def _mib(x) -> float | None:
    return None if x is None else x / MIB


def _tables(bench: Bench, s: Settings, table: list[dict]) -> str:
    headers = ["tokens", "method", "KV entries", "expected", "N/r+W bound", "KV MiB", "KV / bound", "prefill s",
               "prefill / full", "decode ms/tok", "decode / full", "peak RSS MiB", "RSS before MiB"]
    rows = [[report.tokens(t["context_tokens"]), t["method"], t["kv_entries"], t["expected_entries"],
             t["bound_entries"], _mib(t["kv_bytes"]), t["kv_bytes_vs_bound"], t["prefill_s"],
             t["prefill_s_vs_full"], 1e3 * t["decode_s_per_token"], t["decode_s_per_token_vs_full"],
             _mib(t["peak_rss_bytes"]), _mib(t["rss_before_bytes"])] for t in table]
    compared = [t for t in table if t["method"] not in ("full", KVPRESS_FULL.name) and t["prefill_s_vs_full"]]
    ratio_rows = [[report.tokens(t["context_tokens"]), t["method"], t["prefill_s_vs_full"],
                   t["decode_s_per_token_vs_full"], t["kv_bytes_vs_full"]] for t in compared]
    return (f"# Efficiency ({bench.args.mode})\n\n{bench.describe()}"
            f"- {s.repeats} repeat(s), minimum kept; full attention and beacons alternate in one process; "
            f"{s.n_decode} greedy decode steps; {_per_entry(bench):,} bytes per KV entry (all layers, K+V)\n"
            + ("- kvpress rows are compared with `full-kvpress-venv` (the worker's own unpressed run), the others "
               "with `full`\n" if any(t["method"] == KVPRESS_FULL.name for t in table) else "")
            + f"\n{report.markdown_table(headers, rows)}\n## Ratios to full attention (same process)\n\n"
            f"{report.markdown_table(['tokens', 'method', 'prefill', 'decode/token', 'KV bytes'], ratio_rows)}")


def _plots(bench: Bench, s: Settings, table: list[dict], out: Path) -> None:
    fig, axes = report.plt.subplots(2, 2, figsize=(11, 8), layout="constrained")
    names = list(dict.fromkeys(t["method"] for t in table))
    panels = [("kv_bytes", "KV held after prefill (MiB)", _mib, True), ("prefill_s", "prefill (s)", None, True),
              ("decode_s_per_token", "decode (ms / token)", lambda x: 1e3 * x, False),
              ("peak_rss_bytes", "peak RSS (MiB)", _mib, False)]
    for ax, (key, label, conv, logy) in zip(axes.flat, panels):
        series = {}
        for name in names:
            pts = [(t["context_tokens"], t[key]) for t in table if t["method"] == name and t[key] is not None]
            series[name] = ([x for x, _ in pts], [conv(y) if conv else y for _, y in pts])
        report.line_plot(None, series, xlabel="context tokens", ylabel=label, title=label, logy=logy, ax=ax)
    fig.suptitle(f"{bench.model_name} on {bench.hardware}", fontsize=10)
    report.save(fig, out / f"{bench.stem}_efficiency.png")


def settings_from(args: argparse.Namespace) -> Settings:
    return with_overrides(SETTINGS[args.mode], lengths=args.lengths, repeats=args.repeats, n_decode=args.n_decode)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (tokens)")
    parser.add_argument("--repeats", type=int, help="alternating repeats (minimum kept)")
    parser.add_argument("--n-decode", type=int, help="greedy decode steps timed")


def main(argv=None) -> int:
    return runner_main(argv, __doc__.splitlines()[0], add_args, settings_from, run)


if __name__ == "__main__":
    raise SystemExit(main())
