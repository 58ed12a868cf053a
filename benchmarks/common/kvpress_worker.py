"""Run kvpress measurements; executed INSIDE the kvpress venv (transformers<5.3).

Usage: ``python kvpress_worker.py JOB.json RESULT.json`` (``kvpress_env.run_kvpress_job`` does
this). Must not import beacon_peft; imports only its pure-python sibling ``metrics``; mirrors
``beacon_peft.metrics.tail_nll`` for the compressed caches of kvpress.
Progress lines go to stderr; the result is written as JSON to RESULT.json.

Job::

    {"model_dir": str,                   # stock transformers safetensors folder (Llama-like)
     "dtype": "float32"|"bfloat16"|"float16",          # default float32
     "threads": int | null,              # torch.set_num_threads
     "attn_implementation": str | null,  # default: transformers' choice (sdpa)
     "warmup": bool,                     # one short forward before measuring (default true)
     "measurements": [
       {"kind": "tail_nll", "id": any, "presses": [PRESS...],
        "context_ids": [int], "tail_ids": [int], "tail_chunk": 512},
       {"kind": "generate", "id": any, "presses": [PRESS...],
        "context_ids": [int], "question_ids": [int] | [[int], ...],
        "max_new_tokens": 32, "stop_at_eos": true},
       {"kind": "efficiency", "id": any, "presses": [PRESS...],
        "context_ids": [int], "n_decode": 32}]}
    PRESS = {"name": "none"|"snapkv"|"streamingllm"|"knorm"|"expected_attention",
             "compression_ratio": float, ...extra press constructor kwargs, e.g. window_size}

Semantics (mirroring kvpress's own pipeline): the context is prefilled in ONE forward inside the
press context (the press compresses each layer's cache right after that layer's attention, so
the prefill's own outputs see the full context); every later token (tail, question, decode)
runs OUTSIDE the press with explicit ``position_ids`` continuing from the true context length,
so it attends to the compressed cache at correct RoPE positions. The question is not compressed.

- tail_nll: first tail token scored from the prefill's last logits, the rest from tail logits;
  returns sum_nll (nats), count (= len(tail_ids)), perplexity.
- generate: greedy; generated_ids include the EOS token if one stopped generation. Several
  questions share one compressed context (the cache is truncated back between questions).
- efficiency: prefill_s (full model forward, logits of last token only), kv_bytes held after
  prefill, decode_s_per_token over n_decode greedy steps, rss_before_bytes and peak_rss_bytes
  (RSS high-water mark since just before this press's prefill, Linux; lifetime peak elsewhere).

Result::

    {"versions": {...}, "load_s": float, "hardware": str, "peak_rss_bytes": int,
     "measurements": [{"kind", "id", "results": [{"press", "compression_ratio",
         "context_tokens", "kept_tokens", "kv_bytes", "elapsed_s", <kind fields> | "error"}]}]}
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import metrics  # the sibling module (pure python): a script's folder is the first entry of sys.path

PRESS_CLASSES = {
    "snapkv": "SnapKVPress",
    "streamingllm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
}


def log(msg: str) -> None:
    print(f"[kvpress-worker] {msg}", file=sys.stderr, flush=True)


def make_press(spec: dict):
    """(press or None, label). ``none`` or compression_ratio 0 -> no press (full attention)."""
    import kvpress

    spec = dict(spec)
    name = spec.pop("name")
    ratio = float(spec.pop("compression_ratio", 0.0))
    if name == "none":
        return None
    if name not in PRESS_CLASSES:
        raise ValueError(f"unknown press {name!r}; known: none, {', '.join(PRESS_CLASSES)}")
    return getattr(kvpress, PRESS_CLASSES[name])(compression_ratio=ratio, **spec)


def cache_tensors(cache):
    for layer in cache.layers:
        yield getattr(layer, "keys", None)
        yield getattr(layer, "values", None)


def cache_stats(cache) -> dict:
    lens = [layer.keys.shape[-2] for layer in cache.layers]
    return dict(kept_tokens=max(lens), kept_tokens_min=min(lens), kv_bytes=metrics.kv_bytes(cache_tensors(cache)))


class Runner:
    def __init__(self, job: dict):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()

        self.torch = torch
        self.lifetime_peak = 0
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        dtype = getattr(torch, job.get("dtype", "float32"))
        kw = {"dtype": dtype}
        if job.get("attn_implementation"):
            kw["attn_implementation"] = job["attn_implementation"]
        if not (Path(job["model_dir"]) / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {job['model_dir']!r} is not a transformers model folder")
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **kw).eval()
        self.load_s = time.perf_counter() - t0
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        if job.get("warmup", True):
            with torch.no_grad():
                self.model(torch.arange(16).unsqueeze(0) % self.model.config.vocab_size)

    def ids(self, ids):
        return self.torch.tensor([list(ids)], dtype=self.torch.long)

    def prefill(self, press, context_ids, lm_head: bool = True):
        """Prefill under the press; returns (cache, last-token logits or None, seconds)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        ctx = press(self.model) if press is not None else nullcontext()
        t0 = time.perf_counter()
        with ctx:
            if lm_head:
                out = self.model(input_ids=self.ids(context_ids), past_key_values=cache, logits_to_keep=1)
                logits = out.logits[0, -1].float()
            else:
                self.model.model(input_ids=self.ids(context_ids), past_key_values=cache)
                logits = None
        return cache, logits, time.perf_counter() - t0

    def step(self, cache, ids, start_pos: int, logits_to_keep: int = 0):
        torch = self.torch
        pos = torch.arange(start_pos, start_pos + len(ids)).unsqueeze(0)
        out = self.model(
            input_ids=self.ids(ids), past_key_values=cache, position_ids=pos, logits_to_keep=logits_to_keep
        )
        return out.logits[0].float()

    def tail_nll(self, press, m: dict) -> dict:
        F = self.torch.nn.functional
        ctx, tail = m["context_ids"], m["tail_ids"]
        chunk = int(m.get("tail_chunk", 512))
        cache, last_logits, _ = self.prefill(press, ctx)
        res = cache_stats(cache)
        sum_nll = float(F.cross_entropy(last_logits[None], self.ids(tail[:1])[0], reduction="sum"))
        pos = len(ctx)
        for s in range(0, len(tail) - 1, chunk):
            piece = tail[s : s + chunk]
            targets = tail[s + 1 : s + 1 + len(piece)]
            logits = self.step(cache, piece, pos)[: len(targets)]
            sum_nll += float(F.cross_entropy(logits, self.ids(targets)[0], reduction="sum"))
            pos += len(piece)
        res.update(sum_nll=sum_nll, count=len(tail), perplexity=metrics.perplexity(sum_nll, len(tail)))
        return res

    def greedy(self, cache, first_logits, start_pos: int, n: int, stop_at_eos: bool) -> list[int]:
        out = [int(first_logits.argmax())]
        pos = start_pos
        while len(out) < n and not (stop_at_eos and out[-1] in self.eos):
            out.append(int(self.step(cache, out[-1:], pos, logits_to_keep=1)[-1].argmax()))
            pos += 1
        return out

    def generate(self, press, m: dict) -> dict:
        ctx, qs = m["context_ids"], m["question_ids"]
        single = not qs or not isinstance(qs[0], list)
        qs = [qs] if single else qs
        cache, _, _ = self.prefill(press, ctx, lm_head=False)
        res = cache_stats(cache)
        lens = [layer.keys.shape[-2] for layer in cache.layers]
        answers = []
        for q in qs:
            logits = self.step(cache, q, len(ctx), logits_to_keep=1)[-1]
            answers.append(
                self.greedy(cache, logits, len(ctx) + len(q), int(m.get("max_new_tokens", 32)),
                            m.get("stop_at_eos", True))
            )
            for layer, n in zip(cache.layers, lens):  # drop question+answer, as kvpress's pipeline does
                layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
        res["generated_ids"] = answers[0] if single else answers
        return res

    def efficiency(self, press, m: dict) -> dict:
        ctx, n = m["context_ids"], int(m.get("n_decode", 32))
        rss0 = metrics.current_rss_bytes()
        self.lifetime_peak = max(self.lifetime_peak, metrics.peak_rss_bytes())  # reset clears it
        reset = metrics.reset_peak_rss()
        cache, logits, prefill_s = self.prefill(press, ctx)
        res = cache_stats(cache)
        tok, t0 = int(logits.argmax()), time.perf_counter()
        for i in range(n):
            tok = int(self.step(cache, [tok], len(ctx) + i, logits_to_keep=1)[-1].argmax())
        decode_s = time.perf_counter() - t0
        res.update(
            prefill_s=prefill_s,
            n_decode=n,
            decode_s_per_token=decode_s / n if n else None,
            rss_before_bytes=rss0,
            peak_rss_bytes=metrics.peak_rss_since_reset_bytes() if reset else metrics.peak_rss_bytes(),
            peak_rss_scope="since_prefill" if reset else "process",
        )
        return res


def run(job: dict) -> dict:
    import torch
    import transformers

    runner = Runner(job)
    log(f"model loaded in {runner.load_s:.1f}s from {job['model_dir']}")
    out = []
    for mi, m in enumerate(job.get("measurements", [])):
        kind = m["kind"]
        if kind not in ("tail_nll", "generate", "efficiency"):
            raise ValueError(f"unknown measurement kind {kind!r}")
        results = []
        for spec in m.get("presses", [{"name": "none", "compression_ratio": 0.0}]):
            label = f"{kind}#{mi} {spec['name']}@{spec.get('compression_ratio', 0.0)} ctx={len(m['context_ids'])}"
            rec = dict(press=spec["name"], compression_ratio=float(spec.get("compression_ratio", 0.0)),
                       context_tokens=len(m["context_ids"]))
            t0 = time.perf_counter()
            try:
                press = make_press(spec)
                with torch.inference_mode():
                    rec.update(getattr(runner, kind)(press, m))
            except Exception as e:  # one press failing must not lose the others
                rec["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
                log(f"{label}: ERROR {type(e).__name__}: {e}")
            rec["elapsed_s"] = time.perf_counter() - t0
            if "error" not in rec:
                log(f"{label}: done in {rec['elapsed_s']:.1f}s (kept {rec.get('kept_tokens')})")
            results.append(rec)
        out.append(dict(kind=kind, id=m.get("id", mi), results=results))
    return dict(
        versions=dict(kvpress=_dist_version("kvpress"), transformers=transformers.__version__,
                      torch=torch.__version__, python=sys.version.split()[0]),
        load_s=runner.load_s,
        hardware=metrics.hardware_string(),
        peak_rss_bytes=max(runner.lifetime_peak, metrics.peak_rss_bytes()),
        measurements=out,
    )


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    result = run(job)
    tmp = Path(argv[2] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
