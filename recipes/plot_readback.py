"""The read-back stage's training curve: key information and context gain (held-out probe, at the run's
``--probe_ratio``, 8 unless set) against training tokens, beside the loss terms, as a PNG and a markdown table.

    python recipes/plot_readback.py outputs/readback-cpu --out benchmarks/results/readback --name cpu

Reads ``curve.json`` and ``train_log.jsonl`` of a `recipes/train_readback.py` run; writes ``<name>_curve.png``
and ``<name>_curve.md`` under ``--out`` (refusing to overwrite them unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(run: Path) -> tuple[list[dict], list[dict]]:
    curve_path = run / "curve.json"
    if not curve_path.is_file():
        raise ValueError(f"{run} holds no curve.json: pass the output_dir of a recipes/train_readback.py run")
    log_path = run / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    # a run resumed from a checkpoint older than its last log lines logs those steps again: the later lines are the
    # trajectory the run went on from, so each step keeps its last record
    by_step = {r["step"]: r for r in log}
    return json.loads(curve_path.read_text()), [by_step[k] for k in sorted(by_step)]


def probe_ratio(curve: list[dict]) -> str:
    """The compression ratio(s) the curve's probes ran at: each point records its ``ratio`` (curves written before
    ``--probe_ratio`` existed probed at 8)."""
    return "/".join(str(r) for r in sorted({p.get("ratio", 8) for p in curve}))


def loss_terms(log: list[dict]) -> dict[str, str]:
    """The logged loss terms to show, by key: always the three CE/KL terms, the hidden-state distance when the run
    trained with it (``--hidden_weight`` > 0)."""
    terms = {"text": "CE prose", "answer": "CE answers", "kl": "KL to base"}
    if any(r.get("hidden", 0) > 0 for r in log):
        terms["hidden"] = "hidden distance"
    return terms


def table(curve: list[dict], log: list[dict]) -> str:
    """One row per curve point; loss terms from the nearest logged step at or before it (the hidden-state distance
    only for runs that used it)."""
    terms = loss_terms(log)
    unseen = any("key_information_unseen" in p for p in curve)  # runs with composed phrasings also probe unseen ones
    exact = any("key_exact" in p for p in curve)  # curves since recipe 15 also score exact read-back
    at = f"nats, ratio {probe_ratio(curve)}"
    lines = [f"| step | tokens | key information ({at}) | " + (f"unseen phrasings ({at}) | " if unseen else "")
             + ("key tokens right | keys exact | " if exact else "")
             + f"context gain ({at}) | " + " | ".join(terms.values()) + " |",
             "|---|---|---|---|" + ("---|" if unseen else "") + ("---|---|" if exact else "") + "---|" * len(terms)]
    for point in curve:
        logged = [r for r in log if r["step"] <= point["step"]]
        last = logged[-1] if logged and point["step"] else {}
        gain = point.get("context_gain")
        cells = [str(point["step"]), f"{point['tokens']:,}", f"{point['key_information']:.3f}"]
        if unseen:
            cells.append(f"{point['key_information_unseen']:.3f}" if "key_information_unseen" in point else "")
        if exact:
            cells += [f"{point[k]:.0%}" if k in point else "" for k in ("key_token_accuracy", "key_exact")]
        cells.append("" if gain is None else f"{gain:.3f}")
        cells += [f"{last[k]:.{3 if k == 'hidden' else 2}f}" if k in last else "" for k in terms]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curve: list[dict], log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    tokens = [p["tokens"] / 1e3 for p in curve]
    left.plot(tokens, [p["key_information"] for p in curve], marker="o", label="key information")
    unseen = [(p["tokens"] / 1e3, p["key_information_unseen"]) for p in curve if "key_information_unseen" in p]
    if unseen:
        left.plot(*zip(*unseen), marker="^", label="key information, unseen phrasings")
    gains = [(p["tokens"] / 1e3, p["context_gain"]) for p in curve if p.get("context_gain") is not None]
    if gains:
        left.plot(*zip(*gains), marker="s", label="context gain")
    left.axhline(0, color="grey", lw=0.5)
    left.set(xlabel="training tokens (thousands)", ylabel="nats per token",
             title=f"held-out memory probe, ratio {probe_ratio(curve)}")
    left.legend(loc="upper left")
    shares = [(p["tokens"] / 1e3, p["key_token_accuracy"], p["key_exact"]) for p in curve if "key_exact" in p]
    if shares:  # exact read-back, a share of key tokens / of whole keys, on its own axis
        share = left.twinx()
        x, right_tokens, exact_keys = zip(*shares)
        share.plot(x, right_tokens, ls="--", marker=".", color="tab:red", label="key tokens right")
        share.plot(x, exact_keys, ls=":", marker="x", color="tab:purple", label="keys exact")
        share.set(ylim=(0, 1.02), ylabel="share read back exactly")
        share.legend(loc="lower right")
    for key, label in loss_terms(log).items():
        points = [(r["tokens"] / 1e3, r[key]) for r in log if key in r]
        if points:
            right.plot(*zip(*points), label=label)
    right.set(xlabel="training tokens (thousands)", ylabel="nats per token", title="training loss terms")
    right.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="output_dir of a recipes/train_readback.py run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/readback"))
    p.add_argument("--name", default="readback", help="file stem: <name>_curve.png / .md")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of that name")
    args = p.parse_args(argv)
    curve, log = load_run(args.run)
    png, md = args.out / f"{args.name}_curve.png", args.out / f"{args.name}_curve.md"
    existing = [str(f) for f in (png, md) if f.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"refusing to overwrite {existing}: pass --overwrite or another --name")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curve, log, png, f"read-back training ({args.run.name})")
    md.write_text(table(curve, log))
    print(md.read_text(), end="")
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
