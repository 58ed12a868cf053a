"""The README's table and figure (benchmarks/at_a_glance.py) repeat the result files' numbers, nothing else."""

from __future__ import annotations

import json

from benchmarks import at_a_glance


def test_table_repeats_the_result_files(tmp_path, monkeypatch):
    monkeypatch.setattr(at_a_glance, "OUT", tmp_path / "figures" / "at-a-glance")
    at_a_glance.main()
    text = (tmp_path / "figures" / "at-a-glance.md").read_text()
    assert (tmp_path / "figures" / "at-a-glance.png").stat().st_size > 10_000
    v3 = json.loads((at_a_glance.LM / at_a_glance.PERPLEXITY_FILES[0]).read_text())["perplexity"]
    full = next(r["perplexity"] for r in v3 if r["method"] == "full" and r["context_tokens"] == 8192)
    beacon = next(r["perplexity"] for r in v3 if r["method"] == "v3-r8" and r["context_tokens"] == 8192)
    row = next(line for line in text.splitlines() if line.startswith("| perplexity, 8K"))
    assert row.split(" | ")[1:3] == [f"{full:.1f}", f"{beacon:.1f}"]
    passkeys = json.loads((at_a_glance.RETRIEVAL / "long-16k-32k-v3-ship.json").read_text())["accuracy"]
    share = next(r["accuracy"] for r in passkeys if r["context_tokens"] == 32768)
    row = next(line for line in text.splitlines() if line.startswith("| pass keys found, 32K"))
    assert row.split(" | ")[2] == f"{share:.0%}" and row.split(" | ")[1] == "n/a"
