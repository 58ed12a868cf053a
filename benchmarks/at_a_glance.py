"""The README's figure and table: the shipped SmolLM2 adapter against full attention and two kvpress presses at the
same KV budget, gathered from the benchmark result files named below (nothing is re-measured here).

    python benchmarks/at_a_glance.py        # writes docs/figures/at-a-glance.png and .md

Each number comes from one result file; the commands that made them are in those files and in docs/benchmarks.md.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures" / "at-a-glance"
LM = ROOT / "benchmarks" / "language_modeling" / "results"
RETRIEVAL = ROOT / "benchmarks" / "retrieval" / "results"
EFFICIENCY = ROOT / "benchmarks" / "efficiency" / "results"

# label in the figure -> method name in the result files (v3 = the shipped adapter)
METHODS = {"full attention": "full", "beacons (shipped v3)": "v3", "SnapKV": "kvpress-snapkv",
           "StreamingLLM": "kvpress-streamingllm"}
PERPLEXITY_FILES = ("long-4samples-v3-cand10.json", "long-4samples-v2-ship.json")  # v3; presses (same texts, seeds)
PASSKEY_FILES = ("long-4k-8k-v3-cand10.json", "long-16k-32k-v3-ship.json", "long-4k-8k-v2-ship.json")
EFFICIENCY_FILES = ("quick.json", "prefill-4k-8k.json")  # presses at 4K (quick); beacons at 4K and 8K


def _rows(folder: Path, names, key: str) -> list[dict]:
    return [dict(row, source=name) for name in names for row in json.loads((folder / name).read_text())[key]]


def _family(method: str) -> str | None:
    for label, prefix in METHODS.items():
        if method == prefix or method.startswith(prefix + "-"):
            return label
    return None


def _ratio(row: dict) -> int:
    return int(row.get("compression") or 1)


def gather() -> dict:
    """{'perplexity': {label: {(tokens, r): value}}, 'passkey': {label: {tokens: share}}, 'prefill': {label:
    {tokens: time / full attention's}}}, at ratio 8 except the perplexity's ratio sweep."""
    data: dict = {"perplexity": {}, "passkey": {}, "prefill": {}}
    for row in _rows(LM, PERPLEXITY_FILES, "perplexity"):
        label = _family(row["method"])
        if label:
            data["perplexity"].setdefault(label, {}).setdefault((row["context_tokens"], _ratio(row)), row["perplexity"])
    for row in _rows(RETRIEVAL, PASSKEY_FILES, "accuracy"):
        label = _family(row["method"])
        if label and row["task"] == "passkey" and (label != "beacons (shipped v3)" or "-r8" in row["method"]):
            data["passkey"].setdefault(label, {}).setdefault(row["context_tokens"], row["accuracy"])
    for name in EFFICIENCY_FILES:
        report = json.loads((EFFICIENCY / name).read_text())
        for row in report["rows"]:
            label = "beacons (shipped v3)" if row["method"].startswith("beacon") else _family(row["method"])
            if label and label != "full attention" and _ratio(row) == 8:
                data["prefill"].setdefault(label, {})[row["context_tokens"]] = row["prefill_s_vs_full"]
    return data


def table(data: dict) -> str:
    def cell(value, fmt="{:.2f}"):
        return "n/a" if value is None else fmt.format(value)

    lines = ["| at ratio 8 (KV budget 1/8) | full attention | beacons (shipped v3) | SnapKV | StreamingLLM |",
             "|---|---|---|---|---|"]
    labels = list(METHODS)
    ppl = data["perplexity"]
    lines.append("| KV held / full attention | 1 | 0.125 | 0.125 | 0.125 |")
    for tokens in (4096, 8192):
        row = [data["prefill"].get(label, {}).get(tokens) for label in labels[1:]]
        lines.append(f"| prefill time / full attention, {tokens // 1024}K | 1 | " +
                     " | ".join(cell(v) for v in row) + " |")
    for tokens in (8192, 32768):
        row = [ppl.get(label, {}).get((tokens, 1 if label == "full attention" else 8)) for label in labels]
        lines.append(f"| perplexity, {tokens // 1024}K tokens (lower is better) | " +
                     " | ".join(cell(v, "{:.1f}") for v in row) + " |")
    for tokens in (4096, 8150, 16384, 32768):
        row = [data["passkey"].get(label, {}).get(tokens) for label in labels]
        lines.append(f"| pass keys found, {round(tokens / 1024)}K tokens (10 keys, 5 depths) | " +
                     " | ".join(cell(v, "{:.0%}") for v in row) + " |")
    return "\n".join(lines)


def figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full attention": "black", "beacons (shipped v3)": "tab:blue", "SnapKV": "tab:orange",
              "StreamingLLM": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, values in data["perplexity"].items():
        points = sorted((r, v) for (tokens, r), v in values.items() if tokens == 8192)
        if label == "full attention":
            left.axhline(points[0][1], color="black", linestyle="--", label=label)
        else:
            left.plot([r for r, _ in points], [v for _, v in points], "o-", color=colors[label], label=label)
    left.set(xscale="log", xlabel="compression ratio r (KV held: 1/r)", ylabel="perplexity, last 256 tokens",
             title="8K tokens of held-out essays")
    left.set_xticks([2, 4, 8, 16], labels=["2", "4", "8", "16"])
    left.minorticks_off()
    left.legend()
    for label, values in data["passkey"].items():
        points = sorted(values.items())
        right.plot([t / 1024 for t, _ in points], [100 * v for _, v in points], "o-", color=colors[label], label=label)
    right.axvline(8, color="grey", linestyle=":")
    right.text(8.3, 55, "native context\n(8,192 positions)", color="grey", fontsize=8)
    right.set(xscale="log", xlabel="context (K tokens)", ylabel="pass keys found (%)", ylim=(-3, 100),
              title="pass key at ratio 8 (10 keys over 5 depths)")
    right.set_xticks([4, 8, 16, 32], labels=["4", "8", "16", "32"])
    right.minorticks_off()
    right.legend()
    fig.suptitle("SmolLM2-135M-Instruct on 2 CPU cores: the shipped beacon adapter vs full attention and kvpress")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    data = gather()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    figure(data, OUT.with_suffix(".png"))
    sources = ", ".join(f"`{f}`" for f in PERPLEXITY_FILES + PASSKEY_FILES + EFFICIENCY_FILES)
    text = (f"{table(data)}\n\nGathered by `python benchmarks/at_a_glance.py` from {sources} "
            "(benchmarks/*/results; prefill: the efficiency benchmark's fresh adapter, same shapes; 8150 tokens for "
            "the '8K' pass keys, the longest prompt full attention reads).\n")
    OUT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
