"""Tests for the benchmark runners (benchmarks/*/run.py and benchmarks/common/{measure,harness,report}.py).

Metrics are checked against hand-computed values (tail perplexity of a model with known logits, KV bytes of
known caches and of beacon memories against the entry formula); the runners' quick paths run end to end on a
tiny random Llama with a byte-level tokenizer (seconds); the same seed gives the same non-timing numbers. The
kvpress part (last section) drives the kvpress venv and is skipped with the reason when it cannot be built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import beacon_peft
import beacon_peft.metrics
from beacon_peft.metrics import kv_bytes_per_entry, tail_nll
from benchmarks import run as run_all
from benchmarks.common import measure, metrics, report
from benchmarks.common.harness import Method, parse_adapters, press_method
from benchmarks.efficiency import run as efficiency
from benchmarks.language_modeling import run as language_modeling
from benchmarks.memory_probe import run as memory_probe
from benchmarks.retrieval import run as retrieval

NATIVE = 768  # tiny model's positions: 512 tokens fit, 1024 do not
FAST = ["--window", "64", "--threads", "1", "--seed", "3"]
TIMING = {"prefill_s", "decode_s_per_token", "peak_rss_bytes", "peak_gpu_bytes"}


# ----------------------------------------------------------------------------- a tiny model on disk


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer Llama (head_dim 16, 2 KV heads) and a byte-level tokenizer (259 ids), saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_bench_model")
    tok = _byte_tokenizer()
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=NATIVE, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- metrics, by hand


class KnownLogits(torch.nn.Module):
    """Logit log(3) on token (t + 1) mod V after token t, 0 elsewhere; honours ``logits_to_keep``."""

    V = 10

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.V)
        logits.scatter_(2, ((input_ids + 1) % self.V)[..., None], math.log(3.0))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_tail_nll_known_logits():
    model = KnownLogits()
    # the tail follows the rule (p = 3 / (3 + 9) = 1/4), the context does not: only the tail is scored,
    # and its first token is predicted from the last context position
    ctx, tail = [5, 5, 5, 5, 9], [0, 1, 2, 3]
    total, count = tail_nll(model, ctx + tail, len(tail))
    assert count == 4 and total == pytest.approx(4 * math.log(4.0))
    assert metrics.perplexity(total, count) == pytest.approx(4.0)
    # a tail token off the rule has p = 1/12: geometric mean of 4, 4, 12
    total, count = tail_nll(model, [1, 2, 3, 7], 3)
    assert metrics.perplexity(total, count) == pytest.approx((4 * 4 * 12) ** (1 / 3))
    with pytest.raises(ValueError):
        tail_nll(model, [1, 2, 3], 3)


def test_tail_nll_matches_cross_entropy_and_prefill_then_tail(tiny_dir):
    """On a real model: equals CE of the full logits' last positions; with a beacon adapter it equals
    prefilling the context and feeding the tail through the memory (the equivalence the benchmark uses)."""
    from peft import get_peft_model

    base = _tiny(tiny_dir)
    ids = torch.randint(3, 259, (1, 300), generator=torch.Generator().manual_seed(0))
    T = 40
    with torch.no_grad():
        logits = base(input_ids=ids).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[-T - 1 : -1], ids[0, -T:], reduction="sum")
    assert tail_nll(base, ids[0].tolist(), T)[0] == pytest.approx(float(expected), rel=1e-5)

    model = get_peft_model(base, beacon_peft.BeaconConfig(window=64, ratios=[4])).eval()
    total, _ = tail_nll(model, ids[0].tolist(), T)
    with torch.no_grad():
        first = model(input_ids=ids[:, :-T], logits_to_keep=1)
        rest = model(input_ids=ids[:, -T:], past_key_values=first.past_key_values).logits[0, :-1]
    by_parts = torch.nn.functional.cross_entropy(torch.cat([first.logits[0], rest]), ids[0, -T:], reduction="sum")
    assert total == pytest.approx(float(by_parts), rel=1e-4)


def test_kv_bytes_of_a_dynamic_cache(tiny_dir):
    model = _tiny(tiny_dir)
    per_entry = 2 * 2 * 2 * 16 * 4  # K+V x 2 layers x 2 KV heads x head_dim 16 x fp32
    assert kv_bytes_per_entry(model.config, torch.float32) == per_entry
    assert kv_bytes_per_entry(model.config, torch.bfloat16) == per_entry // 2
    res = measure.prefill_decode(model, list(range(3, 203)), n_decode=3)
    assert res["kv_entries"] == 200 and res["kv_bytes"] == 200 * per_entry
    assert res["prefill_s"] > 0 and res["decode_s_per_token"] > 0 and res["peak_rss_bytes"] > 0


def test_decode_passes_the_cache_under_the_installed_name_for_a_peft_model(tiny_dir):
    """prefill_decode hands the cache back as ``cache=`` on transformers 5.24+ (``past_key_values=`` is deprecated
    there) and as ``past_key_values=`` before, also through a PeftModel, whose own forward takes **kwargs."""
    import warnings

    from peft import get_peft_model

    from beacon_peft.compat import cache_kwarg
    from beacon_peft.reuse import cache_kwargs

    base = _tiny(tiny_dir)
    model = get_peft_model(base, beacon_peft.BeaconConfig(window=64, ratios=[8])).eval()
    assert list(cache_kwargs(model, object())) == list(cache_kwargs(base, object())) == [cache_kwarg(base)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = measure.prefill_decode(model, [3 + i % 250 for i in range(130)], n_decode=3)
    assert res["decode_s_per_token"] > 0
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


def test_beacon_entry_formula_by_hand():
    assert measure.beacon_entries(4096, 1024, 8) == 512  # 4 windows x 128 beacons, open window empty
    assert measure.beacon_entries(4100, 1024, 8) == 512 + 4  # + 4 raw tokens, no beacon yet
    assert measure.beacon_entries(4095, 1024, 8) == 384 + 1023 + 127
    assert measure.beacon_entries(1000, 1024, 8, sink=4) == 4 + 1000 + 125
    assert measure.beacon_bound_entries(4096, 1024, 8) == 512 + 1024
    # the usual estimate sink + N/r + window is an upper bound, within 10% only when the open window is nearly full
    assert measure.beacon_entries(4095, 1024, 8) / measure.beacon_bound_entries(4095, 1024, 8) > 0.99
    assert measure.beacon_entries(4096, 1024, 8) / measure.beacon_bound_entries(4096, 1024, 8) == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", [64, 200, 256, 300])
def test_beacon_memory_bytes_match_the_formula(tiny_dir, n):
    from peft import get_peft_model

    base = _tiny(tiny_dir)
    model = get_peft_model(base, beacon_peft.BeaconConfig(window=64, ratios=[8])).eval()
    res = measure.prefill_decode(model, [3 + i % 250 for i in range(n)], n_decode=0)
    per_entry = kv_bytes_per_entry(base.config, torch.float32)
    assert res["kv_entries"] == measure.beacon_entries(n, 64, 8)
    assert res["kv_bytes"] == measure.beacon_entries(n, 64, 8) * per_entry
    assert res["kv_bytes"] <= measure.beacon_bound_entries(n, 64, 8) * per_entry
    with torch.no_grad():
        memory = model(input_ids=torch.tensor([[3 + i % 250 for i in range(n)]])).past_key_values
    assert metrics.kv_bytes(measure.cache_tensors(memory)) == memory.nbytes() == res["kv_bytes"]


def test_accuracy_aggregation_by_hand():
    rows = [dict(method="m", task="passkey", context_tokens=1024, cell=d, correct=c, digit_similarity=g)
            for d, c, g in [(0, True, 1.0), (0, False, 0.6), (1, True, 1.0), (1, True, 1.0)]]
    rows.append(dict(method="m", task="multikey", context_tokens=1024, cell=None, correct=False,
                     digit_similarity=None))
    acc = retrieval._accuracy(rows)
    assert acc["by_cell"] == {("m", 1024, 0): 0.5, ("m", 1024, 1): 1.0}
    assert acc["by_length"] == {("m", "passkey", 1024): 0.75, ("m", "multikey", 1024): 0.0}
    assert acc["digits"] == {("m", 1024): pytest.approx(0.9)}  # pass keys only


def test_retrieval_answer_scores_a_near_miss_pass_key_with_partial_credit():
    """A pass key one digit off is wrong but keeps 0.8 of its digits; a multi-key answer gets no digit score."""
    bench = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids: " 74395. Remember it."))
    case = dict(task="passkey", length=4096, cell=0, depth_actual=0.0, key=["passkey", 4096, 0, 0], answer="74399")
    row = retrieval._answer(bench, Method("full", "full"), case, [1, 2])
    assert row["correct"] is False and row["digit_similarity"] == pytest.approx(0.8)
    assert retrieval._answer(bench, Method("full", "full"), dict(case, answer="74395"), [1])["digit_similarity"] == 1
    multi = retrieval._answer(bench, Method("full", "full"), dict(case, task="multikey", cell=None), [1])
    assert multi["digit_similarity"] is None


def test_keep_min_and_ratios():
    rows = {}
    full, beacon = Method("full", "full"), Method("beacon-untrained-r8", "beacon", 8, adapter="untrained")
    for m, times in [(full, (4.0, 3.0)), (beacon, (2.5, 2.0))]:
        for t in times:
            efficiency._keep_min(rows, m, 4096, dict(prefill_s=t, decode_s_per_token=t / 10, kv_bytes=8,
                                                     kv_entries=1, peak_rss_bytes=int(100 * t)))
    assert rows[("full", 4096)]["prefill_s"] == 3.0 and rows[("full", 4096)]["peak_rss_bytes"] == 300
    assert rows[("beacon-untrained-r8", 4096)]["prefill_s"] == 2.0
    with pytest.raises(RuntimeError, match="KV bytes"):
        efficiency._keep_min(rows, full, 4096, dict(prefill_s=1.0, decode_s_per_token=0.1, kv_bytes=9))


def test_method_names_and_helpers(tmp_path):
    assert press_method("snapkv", 8).name == "kvpress-snapkv-0.875"
    assert press_method("knorm", 4).compression_ratio == 0.75
    assert press_method("snapkv", 8).family == "kvpress-snapkv"
    assert Method("beacon-untrained-r16", "beacon", 16, "untrained").family == "beacon-untrained"
    assert report.tokens(131072) == "128K" and report.tokens(1000) == "1000"
    table = report.markdown_table(["a", "b"], [["x", None], ["y", 0.123456]])
    assert table == "| a | b |\n|---|---|\n| x | n/a |\n| y | 0.123 |\n"
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    assert parse_adapters([str(tmp_path / "ad")]) == [("beacon", tmp_path / "ad")]
    assert parse_adapters([f"mine={tmp_path / 'ad'}", str(tmp_path / "ad")])[1][0] == "beacon-ad"
    with pytest.raises(SystemExit):
        parse_adapters([str(tmp_path)])


# ----------------------------------------------------------------------------- runners end to end


def _summary(root: Path) -> list[dict]:
    return metrics.read_summary(root / "results" / "summary.jsonl")


def _numbers(records: list[dict]) -> dict:
    return {(r["benchmark"], r["method"], r["context_tokens"], r["metric"]): r["value"]
            for r in records if r["metric"] not in TIMING}


def _run_all(tiny_dir, out: Path, *extra: str) -> list[dict]:
    assert run_all.main(["--quick", "--model", str(tiny_dir), "--out-root", str(out), *FAST, *extra]) == 0
    return _summary(out)


def test_runners_quick_end_to_end(tiny_dir, tmp_path, capsys):
    """Each runner's quick path on the tiny model (short lengths), then the same seed again: same numbers."""
    lm = ["--lengths", "512", "1024", "--tail", "32", "--sweep-length", "512"]
    for module, extra in [(language_modeling, lm), (retrieval, ["--lengths", "512", "1024"]),
                          (efficiency, ["--lengths", "512", "1024", "--repeats", "1", "--n-decode", "2"])]:
        assert module.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path),
                            *FAST, "--ratios", "4", "8", *extra]) == 0
    out = capsys.readouterr().out
    assert "# Language modelling (quick)" in out and "# Retrieval (quick)" in out and "# Efficiency (quick)" in out
    records = _summary(tmp_path)
    assert all(tuple(r) == metrics.SUMMARY_FIELDS for r in records)
    got = {(r["benchmark"], r["method"], r["context_tokens"], r["metric"]) for r in records}
    for method in ("full", "beacon-untrained-r4", "beacon-untrained-r8"):
        assert ("language_modeling", method, 512, "perplexity") in got
        assert ("retrieval", method, 512, "passkey_accuracy") in got
        assert ("retrieval", method, 512, "multikey_accuracy") in got
        assert ("retrieval", method, 512, "passkey_digit_similarity") in got
        assert ("efficiency", method, 512, "kv_bytes") in got
    assert ("language_modeling", "full", 1024, "perplexity") not in got  # beyond the 768 native positions
    assert ("retrieval", "full", 1024, "passkey_accuracy") not in got
    assert ("language_modeling", "beacon-untrained-r8", 1024, "perplexity") in got
    assert ("language_modeling", "beacon-untrained-r16", 512, "perplexity") in got  # quick ratio sweep
    per_entry = 2 * 2 * 2 * 16 * 4
    by = {k: r["value"] for r in records for k in [(r["benchmark"], r["method"], r["context_tokens"], r["metric"])]}
    assert by[("efficiency", "full", 512, "kv_bytes")] == 512 * per_entry
    expected = measure.beacon_entries(1024, 64, 8) * per_entry
    assert by[("efficiency", "beacon-untrained-r8", 1024, "kv_bytes")] == expected
    for name in ("language_modeling", "retrieval", "efficiency"):
        folder = tmp_path / name / "results"
        assert json.loads((folder / "quick.json").read_text())["mode"] == "quick"
        assert (folder / "quick.md").read_text().startswith("#")
        assert list(folder.glob("quick_*.png"))
    answers = json.loads((tmp_path / "retrieval" / "results" / "quick.json").read_text())["answers"]
    assert {a["task"] for a in answers} == {"passkey", "multikey"} and all(len(a["answer"]) == 5 for a in answers)
    for a in answers:  # partial credit: pass keys only, within [0, 1]
        assert (a["digit_similarity"] is None) == (a["task"] == "multikey")
        if a["task"] == "passkey":
            assert 0.0 <= a["digit_similarity"] <= 1.0
    assert "## Pass-key digit similarity" in (tmp_path / "retrieval" / "results" / "quick.md").read_text()

    again = tmp_path / "again"
    for module, extra in [(language_modeling, lm), (retrieval, ["--lengths", "512", "1024"])]:
        module.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(again), *FAST,
                     "--ratios", "4", "8", *extra])
    first = {k: v for k, v in _numbers(records).items() if k[0] != "efficiency"}
    assert _numbers(_summary(again)) == first


def _count_calls(monkeypatch, name: str, module=measure) -> list:
    """Patch ``module.<name>`` (``measure`` by default) to append to the returned list on every call (then do its
    work)."""
    calls, fn = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def test_retrieval_full_from_reuses_full_attention_and_refuses_other_settings(tiny_dir, tmp_path, monkeypatch):
    """--full-from RESULT.json: full attention's answers come from the file (no generation for them), equal to
    what the run made; another seed or threads, a tampered case, a missing file are refused before any answer."""
    common = ["--quick", "--no-kvpress", "--model", str(tiny_dir), *FAST, "--ratios", "8", "--lengths", "512"]
    calls = _count_calls(monkeypatch, "greedy")  # answers generated
    assert retrieval.main([*common, "--out-root", str(tmp_path / "a")]) == 0
    made = tmp_path / "a" / "retrieval" / "results" / "quick.json"
    first, ran = json.loads(made.read_text()), len(calls)
    full = [a for a in first["answers"] if a["method"] == "full"]
    assert full and first["full_from"] is None

    calls.clear()
    assert retrieval.main([*common, "--out-root", str(tmp_path / "b"), "--full-from", str(made)]) == 0
    assert len(calls) == ran - len(full)  # only the beacon answers were generated
    second = json.loads((tmp_path / "b" / "retrieval" / "results" / "quick.json").read_text())
    assert second["full_from"] == str(made)
    assert [a for a in second["answers"] if a["method"] == "full"] == full
    assert second["accuracy"] == first["accuracy"] and second["digit_similarity"] == first["digit_similarity"]
    assert f"taken from `{made}`" in (tmp_path / "b" / "retrieval" / "results" / "quick.md").read_text()

    calls.clear()
    with pytest.raises(ValueError, match="seed 3 there, 1 here"):
        retrieval.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(made), "--seed", "1"])
    tampered = tmp_path / "tampered.json"
    rows = [dict(a, answer="00000") if a["method"] == "full" else a for a in first["answers"]]
    tampered.write_text(json.dumps(dict(first, answers=rows)))
    with pytest.raises(ValueError, match="drawn differently"):
        retrieval.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(tampered)])
    assert not calls  # refused before any answer was generated
    with pytest.raises(SystemExit, match="no such file"):
        retrieval.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(tmp_path / "none.json")])


def test_memory_probe_full_from_reuses_full_attention_and_refuses_other_settings(tiny_dir, tmp_path, monkeypatch):
    """--full-from RESULT.json: full attention's rows come from the file (none scored again) and the table is the
    one a full run makes; another seed, other settings, a tampered pair and a missing file are refused before any
    scoring."""
    common = ["--quick", "--no-kvpress", "--model", str(tiny_dir), *FAST, "--ratios", "8", "--lengths", "512",
              "--cases", "2", "--tail", "32"]
    calls = _count_calls(monkeypatch, "tail_logits", beacon_peft.metrics)  # NLLs scored (one forward each)
    assert memory_probe.main([*common, "--out-root", str(tmp_path / "a")]) == 0
    made = tmp_path / "a" / "memory_probe" / "results" / "quick.json"
    first, ran = json.loads(made.read_text()), len(calls)
    full = [r for r in first["rows"] if r["method"] == "full"]
    assert full and first["full_from"] is None

    calls.clear()
    assert memory_probe.main([*common, "--out-root", str(tmp_path / "b"), "--full-from", str(made)]) == 0
    n_full = 2 * len(full)  # two scorings per row: own and other key, or with and without the context
    assert len(calls) == ran - n_full
    second = json.loads((tmp_path / "b" / "memory_probe" / "results" / "quick.json").read_text())
    assert [r for r in second["rows"] if r["method"] == "full"] == full
    assert second["summary"] == first["summary"] and second["full_from"] == str(made)
    assert f"taken from `{made}`" in (tmp_path / "b" / "memory_probe" / "results" / "quick.md").read_text()

    calls.clear()
    with pytest.raises(ValueError, match="seed 3 there, 1 here"):
        memory_probe.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(made), "--seed", "1"])
    with pytest.raises(ValueError, match="settings.tail 32 there, 16 here"):
        memory_probe.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(made), "--tail", "16"])
    tampered = tmp_path / "tampered.json"
    rows = [dict(r, answer="00000") if r["method"] == "full" and r["kind"] == "key" else r for r in first["rows"]]
    tampered.write_text(json.dumps(dict(first, rows=rows)))
    with pytest.raises(ValueError, match="drawn differently"):
        memory_probe.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(tampered)])
    assert not calls  # refused before anything was scored
    with pytest.raises(SystemExit, match="no such file"):
        memory_probe.main([*common, "--out-root", str(tmp_path / "c"), "--full-from", str(tmp_path / "none.json")])


def test_language_modeling_sweep_ratios_narrow_the_ratio_sweep(tiny_dir, tmp_path):
    """--sweep-ratios 8: the sweep length runs full attention and ratio 8 only (the quick mode sweeps 4, 8, 16);
    a ratio below 1 or an empty list is refused before the model loads."""
    common = ["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path), *FAST,
              "--ratios", "4", "8", "--lengths", "512", "--tail", "32", "--sweep-length", "256"]
    for bad in (["--sweep-ratios", "0", "8"], ["--sweep-ratios"]):
        with pytest.raises(ValueError, match="--sweep-ratios"):
            language_modeling.main(common + bad)
    assert language_modeling.main(common + ["--sweep-ratios", "8"]) == 0
    got = {(r["method"], r["context_tokens"]) for r in _summary(tmp_path) if r["metric"] == "perplexity"}
    assert got == {("full", 512), ("beacon-untrained-r4", 512), ("beacon-untrained-r8", 512), ("full", 256),
                   ("beacon-untrained-r8", 256)}


def test_needle_compressed_by_hand():
    """The answer's first token is predicted at position n_prompt - 1; windows before its own are compressed."""
    assert memory_probe.needle_compressed({"needle_token_end": 128}, 129, 64, 64)  # reads in window 2: 0-127 done
    assert not memory_probe.needle_compressed({"needle_token_end": 129}, 129, 64, 64)
    assert memory_probe.needle_compressed({"needle_token_end": 64}, 128, 64, 64)  # reads at 127: window 1 open
    assert not memory_probe.needle_compressed({"needle_token_end": 65}, 128, 64, 64)
    # overlap (stride 48): the last 16 raw activations of a completed window stay raw
    assert memory_probe.needle_compressed({"needle_token_end": 80}, 129, 64, 48)
    assert not memory_probe.needle_compressed({"needle_token_end": 81}, 129, 64, 48)


def test_memory_probe_quick_on_the_tiny_model(tiny_dir, tmp_path, capsys):
    """Both measurements for full attention (where it fits) and a beacon adapter; the table and the summary are
    the means of the per-case rows (key information over compressed needles only)."""
    assert memory_probe.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path),
                              *FAST, "--ratios", "8", "--lengths", "512", "1024", "--cases", "3",
                              "--tail", "32"]) == 0
    assert "# Memory probe (quick)" in capsys.readouterr().out
    got = {(r["method"], r["context_tokens"], r["metric"]): r["value"] for r in _summary(tmp_path)}
    for metric in ("key_information_nats", "context_gain_nats"):
        assert ("full", 512, metric) in got and ("full", 1024, metric) not in got  # 768 native positions
        assert ("beacon-untrained-r8", 512, metric) in got and ("beacon-untrained-r8", 1024, metric) in got
    folder = tmp_path / "memory_probe" / "results"
    result = json.loads((folder / "quick.json").read_text())
    rows = result["rows"]
    for r in rows:
        if r["kind"] == "key":
            assert r["key_information"] == pytest.approx(r["other_nll"] - r["own_nll"])
            assert r["compressed"] is (r["method"] != "full" and r["context_tokens"] >= 512)  # 64-token windows
        else:
            assert r["context_gain"] == pytest.approx(r["alone_nll"] - r["with_context_nll"]) and r["tail"] == 32
    for method, length in (("full", 512), ("beacon-untrained-r8", 1024)):
        keys = [r["key_information"] for r in rows if r["kind"] == "key" and r["method"] == method
                and r["context_tokens"] == length]
        gains = [r["context_gain"] for r in rows if r["kind"] == "text" and r["method"] == method
                 and r["context_tokens"] == length]
        assert len(keys) == 3 and len(gains) == 3
        assert got[(method, length, "key_information_nats")] == pytest.approx(sum(keys) / 3)
        assert got[(method, length, "context_gain_nats")] == pytest.approx(sum(gains) / 3)
    assert (folder / "quick_key_information.png").is_file() and (folder / "quick_context_gain.png").is_file()


def test_memory_probe_in_another_phrasing(tiny_dir, tmp_path):
    """--needle/--question/--intro: the pairs carry the caller's sentence (named in the markdown); a template
    without {key} is refused before the model loads."""
    common = ["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path), *FAST,
              "--ratios", "8", "--lengths", "512", "--cases", "2", "--tail", "32"]
    with pytest.raises(ValueError, match="needle="):
        memory_probe.main(common + ["--needle", "the code is KEY"])
    assert not (tmp_path / "memory_probe").exists()
    assert memory_probe.main(common + ["--needle", " Locker code: {key}. ", "--question", "\nLocker code?",
                                       "--intro", ""]) == 0
    markdown = (tmp_path / "memory_probe" / "results" / "quick.md").read_text()
    assert "phrasing (not the pass-key benchmark's): needle ' Locker code: {key}. '" in markdown
    assert json.loads((tmp_path / "memory_probe" / "results" / "quick.json").read_text())["settings"]["intro"] == ""


def test_trained_adapter_runs_beside_a_fresh_untrained_copy(tiny_dir, tmp_path, capsys):
    """``--adapter LABEL=PATH --with-untrained``: both adapters in one run, the untrained one with the saved
    adapter's settings and fresh weights, so the training's effect is visible in one table."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = get_peft_model(base, beacon_peft.BeaconConfig(window=48, ratios=[4, 8], sink_size=1))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))  # stands in for training
    model.save_pretrained(tmp_path / "ad")
    assert retrieval.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path / "r"),
                           "--threads", "1", "--adapter", f"trained={tmp_path / 'ad'}", "--with-untrained",
                           "--lengths", "512", "--ratios", "8"]) == 0
    assert "fresh UNTRAINED adapter with `trained`'s settings" in capsys.readouterr().out
    got = {(r["method"], r["context_tokens"]) for r in _summary(tmp_path / "r")}
    assert {("trained-r8", 512), ("beacon-untrained-r8", 512), ("full", 512)} <= got
    assert language_modeling.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root",
                                   str(tmp_path / "l"), "--threads", "1", "--adapter", f"trained={tmp_path / 'ad'}",
                                   "--with-untrained", "--lengths", "512", "--sweep-length", "512", "--tail", "32",
                                   "--ratios", "8"]) == 0
    ppl = {r["method"]: r["value"] for r in _summary(tmp_path / "l")
           if r["metric"] == "perplexity" and r["context_tokens"] == 512}
    assert ppl["trained-r8"] != ppl["beacon-untrained-r8"]  # different weights, same settings
    header = json.loads((tmp_path / "l" / "language_modeling" / "results" / "quick.json").read_text())
    assert header["adapters"] == {"trained": str(tmp_path / "ad")}


def test_an_adapter_with_a_base_lora_runs_its_lora_under_the_beacons_and_full_attention_stays_the_base(
        tiny_dir, tmp_path):
    """An adapter folder with ``base_lora/`` (train_readback --base_lora_r): its beacon rows read through base +
    LoRA (they differ from the same beacons without it), full attention is the plain base (equal to a run without
    the LoRA), and it may not share a run with another adapter or --with-untrained (the LoRA would sit under all)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           beacon_peft.BeaconConfig(window=48, ratios=[4, 8], sink_size=1))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "lora")
    torch.manual_seed(1)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora" / "base_lora")

    def perplexities(adapter: str, out: str) -> dict:
        assert language_modeling.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root",
                                       str(tmp_path / out), "--threads", "1", "--adapter", adapter, "--lengths",
                                       "512", "--sweep-length", "512", "--tail", "32", "--ratios", "8"]) == 0
        return {r["method"]: r["value"] for r in _summary(tmp_path / out)
                if r["metric"] == "perplexity" and r["context_tokens"] == 512}

    without = perplexities(f"b={tmp_path / 'plain'}", "p")
    with_lora = perplexities(f"b={tmp_path / 'lora'}", "l")
    assert with_lora["full"] == without["full"]
    assert abs(with_lora["b-r8"] - without["b-r8"]) > 1e-3 * without["b-r8"]
    with pytest.raises(SystemExit, match="base LoRA"):
        language_modeling.main(
            ["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path / "two"), "--adapter",
             f"b={tmp_path / 'lora'}", "--adapter", f"c={tmp_path / 'plain'}", "--lengths", "512", "--ratios", "8"])
    with pytest.raises(SystemExit, match="with-untrained"):
        language_modeling.main(["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root",
                                str(tmp_path / "u"), "--adapter", f"b={tmp_path / 'lora'}", "--with-untrained",
                                "--lengths", "512", "--ratios", "8"])


# ----------------------------------------------------------------------------- with kvpress


@pytest.fixture(scope="module")
def kvpress_ready():
    from benchmarks.common import kvpress_env

    reason = kvpress_env.kvpress_unavailable_reason(create=True)
    if reason is not None:
        pytest.skip(reason)


def test_run_all_with_kvpress_is_reproducible(kvpress_ready, tiny_dir, tmp_path, monkeypatch):
    """benchmarks/run.py --quick on the tiny model with every press; language modelling, retrieval and the memory
    probe again with the same seed give the same numbers."""
    small = dict(language_modeling=language_modeling.Settings([512, 1024], 512, [4, 8], tail=32),
                 retrieval=retrieval.Settings([512], cases=1, multikey_cases=1),
                 memory_probe=memory_probe.Settings([512], cases=2, tail=32),
                 efficiency=efficiency.Settings([512], n_decode=2, repeats=1, warmup_tokens=16))
    for name, s in small.items():
        monkeypatch.setitem(run_all.BENCHMARKS[name].SETTINGS, "quick", s)
    records = _run_all(tiny_dir, tmp_path / "a")
    methods = {r["method"] for r in records}
    presses = {f"kvpress-{p}-0.875" for p in ("snapkv", "streamingllm", "knorm", "expected_attention")}
    assert presses | {"full", "beacon-untrained-r8", "full-kvpress-venv", "kvpress-snapkv-0.75"} <= methods
    by = {(r["benchmark"], r["method"], r["context_tokens"], r["metric"]): r["value"] for r in records}
    per_entry = 2 * 2 * 2 * 16 * 4
    for p in presses:
        assert by[("efficiency", p, 512, "kv_bytes")] == 64 * per_entry  # 512 tokens at a 1/8 budget
        assert ("language_modeling", p, 1024, "perplexity") not in by  # kvpress prefill is full attention
        assert by[("language_modeling", p, 512, "perplexity")] > 1
        assert ("retrieval", p, 512, "multikey_accuracy") in by
    assert by[("efficiency", "full-kvpress-venv", 512, "kv_bytes")] == 512 * per_entry
    assert ("memory_probe", "beacon-untrained-r8", 512, "key_information_nats") in by
    again = _run_all(tiny_dir, tmp_path / "b", "--only", "language_modeling", "retrieval", "memory_probe")
    assert _numbers(again) == {k: v for k, v in _numbers(records).items() if k[0] != "efficiency"}


def test_tail_nll_same_on_both_sides(kvpress_ready, tiny_dir):
    """The worker's unpressed tail_nll and ours score the same tokens with the same weights alike."""
    from benchmarks.common.kvpress_env import run_kvpress_job

    ids = [3 + (7 * i) % 250 for i in range(300)]
    job = dict(model_dir=str(tiny_dir), threads=1, measurements=[dict(
        kind="tail_nll", id=0, context_ids=ids[:-40], tail_ids=ids[-40:], presses=[dict(name="none")])])
    theirs = run_kvpress_job(job)["measurements"][0]["results"][0]
    ours, count = tail_nll(_tiny(tiny_dir), ids, 40)
    assert theirs["count"] == count and theirs["sum_nll"] == pytest.approx(ours, rel=1e-4)


def test_reuse_kvpress_pipeline_asks_one_prefill_per_length_and_reads_the_worker_result():
    """The reuse runner's kvpress comparison: one SnapKV prefill at the adapter's KV budget per length within the
    native positions, 1 and the most questions; the worker's end-to-end times come back as rows."""
    from benchmarks.reuse.run import QUESTIONS, Settings, _kvpress_pipeline, _pipeline_table

    class FakeTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [len(text) % 50 + 3, 7]

    sent = []

    def kvpress(measurements):
        sent.extend(measurements)
        return {"measurements": [{"id": m["id"], "results": [{"elapsed_s": 10.0 + len(m["question_ids"]),
                                                              "kv_bytes": 2**20}]} for m in measurements]}

    bench = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192), tokenizer=FakeTokenizer(),
                            kvpress=kvpress)
    rows = _kvpress_pipeline(bench, Settings([8192, 32768], [1, 4, 16]), {8192: [5] * 8192, 32768: [5] * 32768}, 16)
    assert [m["id"] for m in sent] == ["8192-q1", "8192-q16"]  # 32K is beyond the positions a prefill can read
    assert all(m["presses"] == [{"name": "snapkv", "compression_ratio": 0.875}] for m in sent)
    assert [len(m["question_ids"]) for m in sent] == [1, 16] and len(QUESTIONS) >= 16
    assert rows == [dict(context_tokens=8192, questions=1, total_s=11.0, kv_bytes=2**20),
                    dict(context_tokens=8192, questions=16, total_s=26.0, kv_bytes=2**20)]
    assert "| 8K | 16 | 26 | 1 |" in _pipeline_table(rows)
    assert _kvpress_pipeline(SimpleNamespace(config=bench.config, tokenizer=FakeTokenizer(), kvpress=lambda m: None),
                             Settings([8192], [1]), {8192: [5] * 10}, 16) == []


def test_retrieval_without_multikey_cases_writes_no_empty_plot_and_bad_counts_are_refused(tiny_dir, tmp_path):
    common = ["--quick", "--no-kvpress", "--model", str(tiny_dir), "--out-root", str(tmp_path), "--threads", "1",
              "--lengths", "512", "--ratios", "8"]
    assert retrieval.main(common + ["--multikey-cases", "0"]) == 0
    folder = tmp_path / "retrieval" / "results"
    assert list(folder.glob("quick_passkey_heatmap.png")) and not list(folder.glob("quick_multikey.png"))
    assert "## Multi-key accuracy\n\nNot run (`--multikey-cases 0`)." in (folder / "quick.md").read_text()
    answers = json.loads((folder / "quick.json").read_text())["answers"]
    assert answers and {a["task"] for a in answers} == {"passkey"}
    for flag, value, message in (("--multikey-cases", "-1", "allowed >= 0"), ("--cases", "0", "allowed >= 1")):
        with pytest.raises(SystemExit, match=f"{flag} {value}: .*{message}"):
            retrieval.main(common + [flag, value])


def test_heldout_retrieval_end_to_end(tiny_dir, tmp_path, monkeypatch):
    """The held-out runner on the tiny model: every method and case answered and scored, full attention only where
    it fits, the markdown's tables and the heatmap written, the records in the summary; --from-json continues a
    stopped run with the same answers; --methods keeps some."""
    from benchmarks.retrieval import heldout

    common = ["--model", str(tiny_dir), "--out-root", str(tmp_path), *FAST, "--ratios", "8",
              "--lengths", "512", "1024", "--depths", "0", "1", "--max-new-tokens", "3"]
    assert heldout.main([*common, "--tag", "ho"]) == 0
    folder = tmp_path / "retrieval" / "results"
    data = json.loads((folder / "ho.json").read_text())
    answers = data["answers"]
    assert {(a["method"], a["context_tokens"]) for a in answers} == {
        ("full", 512), ("beacon-untrained-r8", 512), ("beacon-untrained-r8", 1024)}  # 1024 > 768 positions
    assert len(answers) == 3 * 2 and data["settings"]["split"] == "held_out" and data["complete"]
    for a in answers:
        assert a["exact"] == (a["extracted"] == a["value"]) and 0.0 <= a["in_place"] <= 1.0
        assert (a["compressed"] is None) == (a["method"] == "full")
    markdown = (folder / "ho.md").read_text()
    for title in ("## Exact answers", "## Characters in place", "## Answers that leak a training template",
                  "## Exact by depth", "## Exact by kind", "## Every answer"):
        assert title in markdown
    assert (folder / "ho_heatmap.png").stat().st_size > 0
    got = {(r["method"], r["context_tokens"], r["metric"]) for r in _summary(tmp_path) if r["benchmark"] == "retrieval"}
    assert ("full", 512, "heldout_exact") in got and ("beacon-untrained-r8", 1024, "heldout_leak") in got
    # a stopped run continued: its answers kept, only the missing cases run (here the second depth's)
    stopped = dict(data, answers=[a for a in answers if a["cell"] == 0], complete=False)
    (folder / "stopped.json").write_text(json.dumps(stopped))
    calls = _count_calls(monkeypatch, "greedy")
    assert heldout.main([*common, "--tag", "kept", "--from-json", str(folder / "stopped.json"), "--no-run"]) == 0
    kept = json.loads((folder / "kept.json").read_text())
    assert not calls and not kept["complete"] and len(kept["answers"]) == 3
    assert "**stopped early**: 3 (method, case) answers missing" in (folder / "kept.md").read_text()
    assert heldout.main([*common, "--tag", "stopped", "--from-json", str(folder / "stopped.json")]) == 0
    again = json.loads((folder / "stopped.json").read_text())
    assert len(calls) == 3 and again["complete"]
    key = lambda a: (a["method"], a["context_tokens"], a["cell"])  # noqa: E731
    assert sorted(map(key, again["answers"])) == sorted(map(key, answers))
    assert {key(a): a["generated"] for a in again["answers"]} == {key(a): a["generated"] for a in answers}
    assert heldout.main([*common, "--tag", "only", "--methods", "full"]) == 0
    assert {a["method"] for a in json.loads((folder / "only.json").read_text())["answers"]} == {"full"}
    with pytest.raises(SystemExit, match="allowed names"):
        heldout.main([*common, "--tag", "bad", "--methods", "v9-r8"])
