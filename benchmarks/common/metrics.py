"""Metrics and result records shared by all benchmarks.

Pure Python (torch only imported lazily in ``hardware_string``), so this module works in both
the main venv and the kvpress venv (where ``kvpress_worker`` imports it as a sibling module).

Summary records are one JSON object per line with exactly the fields of ``SUMMARY_FIELDS``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

SUMMARY_FIELDS = (
    "benchmark",
    "method",
    "compression",
    "context_tokens",
    "metric",
    "value",
    "model",
    "hardware",
    "git_commit",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def perplexity(sum_nll: float, count: int) -> float:
    """``exp(sum_nll / count)``: perplexity from a summed negative log-likelihood (nats)."""
    if count <= 0:
        raise ValueError(f"perplexity needs count > 0, got {count}")
    return math.exp(sum_nll / count)


def kv_bytes(tensors: Iterable) -> int:
    """Sum of ``numel() * element_size()`` over tensors (None entries are skipped)."""
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage`` maxrss, in bytes).

    Linux reports ``ru_maxrss`` in KiB, macOS in bytes. Never decreases over a process life;
    use ``reset_peak_rss`` + ``peak_rss_since_reset_bytes`` for a per-phase peak on Linux.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """Current RSS (``VmRSS`` from /proc/self/status) in bytes, or None off Linux."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs`` 5). True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_bytes() -> int:
    """RSS high-water mark (``VmHWM``) since the last ``reset_peak_rss``; falls back to
    ``peak_rss_bytes()`` where /proc is unavailable."""
    kib = _proc_status_kib("VmHWM")
    return peak_rss_bytes() if kib is None else kib * 1024


class Timer:
    """Wall-clock timer (``time.perf_counter``) usable as a context manager.

    >>> with Timer() as t:
    ...     pass
    >>> t.elapsed >= 0
    True
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.elapsed: float = 0.0

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.start


def summary_record(
    benchmark: str,
    method: str,
    compression: float | int | str | None,
    context_tokens: int,
    metric: str,
    value: float | int | str | bool | None,
    model: str,
    hardware: str,
    git_commit: str,
) -> dict:
    """One summary row; exactly the fields of ``SUMMARY_FIELDS``, in that order."""
    rec = dict(
        benchmark=benchmark,
        method=method,
        compression=compression,
        context_tokens=int(context_tokens),
        metric=metric,
        value=value,
        model=model,
        hardware=hardware,
        git_commit=git_commit,
    )
    assert tuple(rec) == SUMMARY_FIELDS
    return rec


def append_summary(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Append records as JSON lines (creating parent folders). Returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, sort_keys=False) + "\n" for r in records]
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
    return len(lines)


def read_summary(path: str | os.PathLike) -> list[dict]:
    """Read back a JSONL summary file (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware_string() -> str:
    """GPU name(s) when torch sees CUDA, else ``"<CPU model> (<n> cores)"``."""
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0)
            return name if n == 1 else f"{n}x {name}"
    except Exception:  # torch missing or CUDA init failure: report the CPU
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{_cpu_model()} ({cores} cores)"


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """HEAD commit hash of the repo (``-dirty`` appended when tracked files differ from
    HEAD), or ``"unknown"`` outside git / before the first commit."""
    cwd = str(repo or _REPO_ROOT)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        sha = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=cwd, capture_output=True, timeout=10
        )
        return sha + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
