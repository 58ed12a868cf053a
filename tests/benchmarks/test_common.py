"""Tests for benchmarks/common: metrics, needle generators, and the kvpress worker.

Everything but the last section is fast and hand-checked. The kvpress section builds (once,
~1-2 min, from PyPI) the separate kvpress venv and drives the worker on a tiny random Llama;
it is skipped with the reason when the venv cannot be created (e.g. offline).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import time

import pytest

from beacon_peft.needles import (
    INTRO,
    MULTIKEY_NEEDLE,
    MULTIKEY_QUESTION,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    make_multikey_case,
    make_passkey_case,
    passkey_pair,
)
from benchmarks.common import metrics

# ----------------------------------------------------------------------------- metrics


def test_perplexity_hand_values():
    assert metrics.perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert metrics.perplexity(0.0, 7) == 1.0
    assert metrics.perplexity(3 * math.log(2) + 3 * math.log(8), 6) == pytest.approx(4.0)  # geo-mean of 2, 8
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


def test_kv_bytes_hand_values():
    torch = pytest.importorskip("torch")
    ts = [torch.zeros(2, 3, 4), torch.zeros(10, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int64), None]
    assert metrics.kv_bytes(ts) == 2 * 3 * 4 * 4 + 10 * 2 + 3 * 8
    # a (batch 1, 3 kv heads, 100 tokens, head_dim 64) fp16 key+value pair per layer, 30 layers
    kv = [torch.zeros(1, 3, 100, 64, dtype=torch.float16)] * 60
    assert metrics.kv_bytes(kv) == 60 * 3 * 100 * 64 * 2
    assert metrics.kv_bytes(iter([])) == 0
    assert metrics.kv_bytes(torch.zeros(4, 4)[:, :2] for _ in range(2)) == 2 * 8 * 4  # views count numel


def test_rss_and_timer():
    peak = metrics.peak_rss_bytes()
    cur = metrics.current_rss_bytes()
    assert peak > 10 * 2**20  # a python with torch imported is well over 10 MiB
    if cur is not None:  # Linux
        assert cur <= peak * 1.01
        if metrics.reset_peak_rss():
            blob = bytearray(64 * 2**20)
            blob[:: 4096] = b"x" * len(blob[:: 4096])  # touch every page
            assert metrics.peak_rss_since_reset_bytes() >= cur + 48 * 2**20
            del blob
    with metrics.Timer() as t:
        time.sleep(0.05)
    assert 0.04 <= t.elapsed < 2.0


def test_summary_record_and_append(tmp_path):
    rec = metrics.summary_record("ppl", "beacon", 8, 2048, "perplexity", 21.5, "SmolLM2-135M", "cpu", "abc")
    assert list(rec) == list(metrics.SUMMARY_FIELDS) == [
        "benchmark", "method", "compression", "context_tokens", "metric", "value", "model", "hardware", "git_commit"]
    assert rec == dict(benchmark="ppl", method="beacon", compression=8, context_tokens=2048, metric="perplexity",
                       value=21.5, model="SmolLM2-135M", hardware="cpu", git_commit="abc")
    path = tmp_path / "sub" / "summary.jsonl"
    assert metrics.append_summary(path, [rec]) == 1
    rec2 = dict(rec, method="snapkv", value=30.0)
    metrics.append_summary(path, [rec2, rec])
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1]) == rec2
    assert metrics.read_summary(path) == [rec, rec2, rec]


def test_hardware_string_and_git_commit(tmp_path):
    hw = metrics.hardware_string()
    assert isinstance(hw, str) and hw
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert hw.endswith("cores)")
    assert metrics.git_commit(tmp_path) == "unknown"  # not a repo
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    try:
        subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
        (tmp_path / "f.txt").write_text("a")
        subprocess.run(git + ["add", "f.txt"], cwd=tmp_path, check=True)
        subprocess.run(git + ["commit", "-q", "-m", "x"], cwd=tmp_path, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git unavailable")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert metrics.git_commit(tmp_path) == sha
    (tmp_path / "f.txt").write_text("b")
    assert metrics.git_commit(tmp_path) == sha + "-dirty"
    assert isinstance(metrics.git_commit(), str)  # this repo (may have no commit yet)


# ----------------------------------------------------------------------------- needles


class CharTokenizer:
    """One token per character: positions and boundaries can be checked by hand."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
HAYSTACK_TEXT = "The cat sat on the mat. It was warm!\nDogs barked outside all day? Yes.\n" * 40
HAYSTACK = TOK.encode(HAYSTACK_TEXT)


def _expected_point(filler: str, pos: int, window: int) -> int:
    bounds = [0, len(filler)] + [i + 1 for i, c in enumerate(filler) if c in ".!?\n"]
    near = [b for b in bounds if abs(b - pos) <= window]
    return min(near, key=lambda b: (abs(b - pos), b)) if near else pos


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("context_tokens", [600, 1500])
def test_passkey_exact_placement_and_length(depth, context_tokens):
    case = make_passkey_case(HAYSTACK, TOK, context_tokens, depth, seed=3)
    key = str(random.Random(3).randint(10000, 99999))
    assert case["answer"] == key
    ctx = case["context_ids"]
    assert len(ctx) == context_tokens
    needle = PASSKEY_NEEDLE.format(key=key)
    s, e = case["needle_token_start"], case["needle_token_end"]
    assert TOK.decode(ctx[s:e]) == needle and e - s == len(needle)
    # removing the needle leaves intro + the haystack's first n_fill tokens, untouched
    n_fill = context_tokens - len(INTRO) - len(needle)
    assert TOK.decode(ctx[:s] + ctx[e:]) == INTRO + HAYSTACK_TEXT[:n_fill]
    # the insertion point is the nearest sentence/newline boundary to depth * n_fill
    filler = HAYSTACK_TEXT[:n_fill]
    p = _expected_point(filler, round(depth * n_fill), 32)
    assert s == len(INTRO) + p
    assert case["depth_actual"] == pytest.approx(p / n_fill)
    assert p in (0, n_fill) or filler[p - 1] in ".!?\n"
    assert TOK.decode(case["question_ids"]) == PASSKEY_QUESTION


def test_passkey_depth_extremes_and_no_snap():
    c0 = make_passkey_case(HAYSTACK, TOK, 800, 0.0, seed=1)
    assert c0["needle_token_start"] == len(INTRO)
    c1 = make_passkey_case(HAYSTACK, TOK, 800, 1.0, seed=1)
    assert c1["needle_token_end"] == 800
    # no boundary within the window: exact position, no snapping
    flat = TOK.encode("abcdefghij" * 200)
    c = make_passkey_case(flat, TOK, 1000, 0.5, seed=1, intro="")
    n_fill = 1000 - len(PASSKEY_NEEDLE.format(key=c["answer"]))
    assert c["needle_token_start"] == round(0.5 * n_fill)
    # a short haystack is cycled
    short = TOK.encode("Short one. ")
    c = make_passkey_case(short, TOK, 300, 0.5, seed=2, intro="")
    s, e = c["needle_token_start"], c["needle_token_end"]
    assert TOK.decode(c["context_ids"][:s] + c["context_ids"][e:]) == ("Short one. " * 40)[: 300 - (e - s)]
    with pytest.raises(ValueError):
        make_passkey_case(HAYSTACK, TOK, 50, 0.5, seed=1)
    with pytest.raises(ValueError):
        make_passkey_case(HAYSTACK, TOK, 800, 1.5, seed=1)


def test_passkey_in_another_phrasing():
    """``needle``/``question``: the same placement rules with a sentence and question of the caller's."""
    needle, question = " My locker code, {key}, is on the fridge. ", "\nWhich code opens my locker? It is"
    case = make_passkey_case(HAYSTACK, TOK, 900, 0.4, seed=4, intro="", needle=needle, question=question)
    s, e = case["needle_token_start"], case["needle_token_end"]
    assert TOK.decode(case["context_ids"][s:e]) == needle.format(key=case["answer"]) and len(case["context_ids"]) == 900
    assert TOK.decode(case["question_ids"]) == question
    assert case["answer"] == make_passkey_case(HAYSTACK, TOK, 900, 0.4, seed=4)["answer"]  # same key, same seed
    for bad in (" no key here ", " {key} and {name} ", " {} ", " {key ", " {0} ", 5):
        with pytest.raises((ValueError, TypeError), match="needle="):
            make_passkey_case(HAYSTACK, TOK, 900, 0.4, seed=4, needle=bad)
    with pytest.raises(ValueError, match="question="):
        make_passkey_case(HAYSTACK, TOK, 900, 0.4, seed=4, question="  ")


def test_passkey_determinism():
    a = make_passkey_case(HAYSTACK, TOK, 700, 0.4, seed=11)
    b = make_passkey_case(HAYSTACK, TOK, 700, 0.4, seed=11)
    c = make_passkey_case(HAYSTACK, TOK, 700, 0.4, seed=12)
    assert a == b
    assert a["answer"] != c["answer"] and len(c["answer"]) == 5


def test_passkey_pair_differs_only_in_the_key():
    own, other = passkey_pair(HAYSTACK, TOK, 700, 0.4, 11, 12, intro="")
    assert own["answer"] != other["answer"] and own["needle_token_start"] == other["needle_token_start"]
    span = slice(own["needle_token_start"], own["needle_token_end"])
    a, b = own["context_ids"], other["context_ids"]
    assert len(a) == len(b) == 700 and a[: span.start] == b[: span.start] and a[span.stop :] == b[span.stop :]
    assert a[span] != b[span] and own["question_ids"] == other["question_ids"]
    assert passkey_pair(HAYSTACK, TOK, 700, 0.4, 11, 11) is None  # the same key twice is no pair


def test_multikey_case():
    case = make_multikey_case(HAYSTACK, TOK, 1800, seed=5, n_keys=4)
    assert case == make_multikey_case(HAYSTACK, TOK, 1800, seed=5, n_keys=4)
    ctx = case["context_ids"]
    assert len(ctx) == 1800
    names, keys, q = case["names"], case["keys"], case["query_index"]
    assert len(set(names)) == 4 and len(set(keys)) == 4 and 0 <= q < 4
    assert case["answer"] == keys[q]
    spans = []
    for n, k, s in zip(names, keys, case["needle_token_starts"]):
        text = MULTIKEY_NEEDLE.format(name=n, key=k)
        assert TOK.decode(ctx[s : s + len(text)]) == text
        spans.append((s, s + len(text)))
    assert case["needle_token_start"] == spans[q][0] and case["needle_token_end"] == spans[q][1]
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)  # default depths are increasing
    rest = [t for i, t in enumerate(ctx) if not any(s <= i < e for s, e in spans)]
    assert TOK.decode(rest) == INTRO + HAYSTACK_TEXT[: len(rest) - len(INTRO)]
    assert TOK.decode(case["question_ids"]) == MULTIKEY_QUESTION.format(name=names[q])
    assert case["depths_actual"] == sorted(case["depths_actual"])
    other = make_multikey_case(HAYSTACK, TOK, 1800, seed=5, n_keys=3, depths=[0.9, 0.1, 0.5], query_index=0)
    depths = other["depths_actual"]
    assert other["query_index"] == 0 and depths[0] > depths[2] > depths[1]


def test_needles_with_a_real_hf_style_tokenizer_interface():
    """Token-level API only needs encode/decode; boundaries from multi-char tokens work too."""

    class WordTok:
        def __init__(self):
            self.vocab: dict[str, int] = {}
            self.inv: dict[int, str] = {}

        def encode(self, text, add_special_tokens=False):
            out = []
            for w in text.replace("\n", " \n ").split(" "):
                w = w if w == "\n" else w + " "
                if w not in self.vocab:
                    self.vocab[w] = len(self.vocab)
                    self.inv[self.vocab[w]] = w
                out.append(self.vocab[w])
            return out

        def decode(self, ids):
            return "".join(self.inv[i] for i in ids)

    tok = WordTok()
    hay = tok.encode(HAYSTACK_TEXT)
    case = make_passkey_case(hay, tok, 300, 0.5, seed=0)
    assert len(case["context_ids"]) == 300
    s = case["needle_token_start"]
    assert tok.decode([case["context_ids"][s - 1]]).rstrip(" ").endswith((".", "!", "?", "\n"))


# ----------------------------------------------------------------------------- kvpress worker

PRESSES = ["snapkv", "streamingllm", "knorm", "expected_attention"]


@pytest.fixture(scope="module")
def kvpress_env():
    from benchmarks.common import kvpress_env as kv

    reason = kv.kvpress_unavailable_reason(create=True)
    if reason is not None:
        pytest.skip(reason)
    return kv


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    return d, model


def test_kvpress_worker_all_presses(kvpress_env, tiny_llama):
    import torch

    model_dir, model = tiny_llama
    rng = random.Random(0)
    ctx = [rng.randrange(3, 256) for _ in range(200)]
    tail = [rng.randrange(3, 256) for _ in range(40)]
    question = [rng.randrange(3, 256) for _ in range(10)]
    presses = [{"name": "none", "compression_ratio": 0.0}] + [{"name": n, "compression_ratio": 0.5} for n in PRESSES]
    job = {"model_dir": str(model_dir), "dtype": "float32", "threads": 2, "measurements": [
        {"kind": "tail_nll", "id": "ppl", "context_ids": ctx, "tail_ids": tail, "tail_chunk": 16,
         "presses": presses + [{"name": "knorm", "compression_ratio": 0.0},
                               {"name": "bogus", "compression_ratio": 0.5}]},
        {"kind": "generate", "id": "gen", "context_ids": ctx, "question_ids": question, "max_new_tokens": 6,
         "stop_at_eos": False, "presses": presses},
        {"kind": "efficiency", "id": "eff", "context_ids": ctx, "n_decode": 4, "presses": presses},
    ]}
    res = kvpress_env.run_kvpress_job(job, timeout=600, check=False)
    assert res["versions"]["kvpress"] == "0.5.5" and res["versions"]["transformers"].startswith("5.2")
    ppl, gen, eff = res["measurements"]
    assert [m["id"] for m in res["measurements"]] == ["ppl", "gen", "eff"]

    # hand-computed full KV: 2 layers x (K, V) x 2 kv heads x 200 tokens x head_dim 16 x 4 bytes
    full = 2 * 2 * 2 * 200 * 16 * 4
    for m in (ppl, gen, eff):
        by = {r["press"]: r for r in m["results"][:5]}
        assert set(by) == {"none", *PRESSES}
        for name, r in by.items():
            assert "error" not in r, (m["kind"], name, r.get("error"))
            assert r["context_tokens"] == 200
        assert by["none"]["kv_bytes"] == full and by["none"]["kept_tokens"] == 200
        for name in PRESSES:  # compression_ratio 0.5 keeps int(200 * 0.5) tokens per head
            assert by[name]["kept_tokens"] == 100
            assert by[name]["kv_bytes"] / full == pytest.approx(0.5, abs=0.02)

    # tail NLL of "none" equals a plain full forward over context + tail (main venv, transformers 5.2x)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + tail])).logits[0].float()
    ref = torch.nn.functional.cross_entropy(logits[len(ctx) - 1 : -1], torch.tensor(tail), reduction="sum").item()
    r = {x["press"] + str(x["compression_ratio"]): x for x in ppl["results"]}
    assert r["none0.0"]["count"] == len(tail)
    assert r["none0.0"]["sum_nll"] == pytest.approx(ref, rel=1e-4)
    assert r["knorm0.0"]["sum_nll"] == pytest.approx(ref, rel=1e-4)  # ratio 0 compresses nothing
    for x in ppl["results"][:5]:
        assert x["perplexity"] == pytest.approx(math.exp(x["sum_nll"] / x["count"]))
    assert "unknown press" in r["bogus0.5"]["error"]

    # greedy generation with no press equals greedy decoding of context + question in the main venv
    ids = ctx + question
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert gen["results"][0]["generated_ids"] == ids[len(ctx) + len(question):]
    for x in gen["results"]:
        assert len(x["generated_ids"]) == 6

    for x in eff["results"]:
        assert x["prefill_s"] > 0 and x["decode_s_per_token"] > 0 and x["n_decode"] == 4
        assert x["peak_rss_bytes"] > 50 * 2**20
    assert res["peak_rss_bytes"] >= max(x["peak_rss_bytes"] for x in eff["results"]) * 0.99


def test_kvpress_worker_failure_raises(kvpress_env, tmp_path):
    job = {"model_dir": str(tmp_path / "missing"), "measurements": []}
    with pytest.raises(RuntimeError, match="kvpress worker failed"):
        kvpress_env.run_kvpress_job(job, timeout=300, echo=False)
