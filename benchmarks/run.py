"""Run every benchmark (language modelling, retrieval, memory probe, efficiency) in one invocation.

    python -m benchmarks.run --quick                  # a few minutes on 2 CPU cores with SmolLM2-135M
    python -m benchmarks.run --full --model DIR       # long contexts (up to 128K tokens): meant for a GPU
    python -m benchmarks.run --quick --adapter adapters/smollm2-135m-beacon --only efficiency

The model is loaded once; each benchmark compares full attention, beacon adapters (``--adapter``, else a fresh
untrained one) at ``--ratios`` and the kvpress presses at the same KV budget, writes
``benchmarks/<name>/results/<mode>.{json,md,png}`` and appends one JSON line per measurement to
``benchmarks/results/summary.jsonl``. The tables are printed at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common.harness import Bench, add_common_args
from benchmarks.efficiency import run as efficiency
from benchmarks.language_modeling import run as language_modeling
from benchmarks.memory_probe import run as memory_probe
from benchmarks.retrieval import run as retrieval

BENCHMARKS = {"language_modeling": language_modeling, "retrieval": retrieval, "memory_probe": memory_probe,
              "efficiency": efficiency}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)
    settings = {name: BENCHMARKS[name].SETTINGS[args.mode] for name in args.only}
    sweep = settings["language_modeling"].sweep_ratios if "language_modeling" in settings else []
    bench = Bench(args, extra_ratios=tuple(sweep))
    tables, seconds = [], {}
    for name in args.only:
        t0 = time.perf_counter()
        tables.append(BENCHMARKS[name].run(bench, settings[name]))
        seconds[name] = time.perf_counter() - t0
        bench.flush_summary()  # a later failure keeps what is done
    print("\n\n".join(tables))
    print("wall time: " + ", ".join(f"{name} {s:.0f}s" for name, s in seconds.items()))
    root = Path(args.out_root)
    print(f"results in {root}/<benchmark>/results/, summary {root / 'results' / 'summary.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
