"""Markdown tables and matplotlib figures (PNG, headless) for the result folders."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NA = "n/a"


def fmt(value, digits: int = 3) -> str:
    """Compact cell text: ``n/a`` for None/NaN, ints as is, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def tokens(n: int) -> str:
    """1024 -> '1K', 131072 -> '128K', 100 -> '100'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
              logx: bool = True, logy: bool = False, ax=None) -> None:
    """One line per series (x, y); points with y None are dropped. Saves ``path`` unless drawing into ``ax``."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if pts:
            style = "k--" if label == "full" else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
        xs = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(xs, [tokens(x) for x in xs])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if own:
        save(fig, path)


def heatmaps(path: Path, grids: dict[str, list[list]], *, xticks: list[str], yticks: list[str], xlabel: str,
             ylabel: str, title: str) -> None:
    """One accuracy heatmap (rows = yticks, cols = xticks, values in [0, 1] or None = not run) per method."""
    n = len(grids)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, 2.9 * rows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = matplotlib.colormaps["RdYlGn"].copy()
    cmap.set_bad("lightgrey")
    image = None
    for ax, (label, grid) in zip(axes.flat, grids.items()):
        data = [[math.nan if v is None else v for v in row] for row in grid]
        image = ax.imshow(data, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, NA if v is None else f"{v:.2g}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(xticks)), xticks, fontsize=7)
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(label, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    save(fig, path)


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
