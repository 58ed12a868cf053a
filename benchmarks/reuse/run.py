"""Reuse: one read of a long document + an answer per question from a fork, against re-reading it per question.

For every context length N and number of questions Q (held-out essay text, plain ``Question: ... Answer:``
prompts, greedy answers of ``max_new_tokens``): ``fork`` = one read (`beacon_peft.reuse.read`) + Q answers from
forks of its memory (`beacon_peft.reuse.ask`), every part measured; ``reread`` = Q calls of ``generate`` over
document + question, each reading the whole document again. Re-reading is measured for the first ``rereads``
questions only (a 32K document read 16 times is ~30 CPU-minutes here); the re-read total for Q questions is
those measured times plus the mean measured time for each further question (the output says so). Every
question that was re-read must get exactly the fork's answer (checked, and a mismatch is an error). The memory
is also saved (fp32 and bf16 storage) and loaded: file sizes against a full KV cache of the same tokens, save
and load times.

    python -m benchmarks.reuse.run --adapter adapters/smollm2-135m-beacon --lengths 8192 --no-kvpress
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from beacon_peft.metrics import kv_bytes_per_entry
from benchmarks.common import measure, report
from benchmarks.common.harness import Bench, Method, runner_main, with_overrides

BENCHMARK = "reuse"
FILE_COLUMNS = ["tokens", "entries", "file MiB (fp32)", "file MiB (bf16)", "full KV MiB", "full KV / file", "save s",
                "load s"]
MIB = 2**20
QUESTIONS = [
    "What is the main argument of the text?", "Who is the author talking to?", "What example does the author give?",
    "What should a founder do first?", "Which company is mentioned?", "What is the problem with committees?",
    "Why do startups fail?", "What does the author recommend?", "What is hard about writing?",
    "What did the author learn?", "What is the last essay about?", "How does the text begin?",
    "What is said about money?", "What is said about programmers?", "Summarize the text in one sentence.",
    "What question does the author ask?",
]


@dataclass
class Settings:
    lengths: list[int]
    questions: list[int]
    rereads: int = 2
    max_new_tokens: int = 16
    ratio: int = 8


SETTINGS = {
    "quick": Settings([8192], [1, 2, 4, 8, 16]),
    "long": Settings([8192, 32768], [1, 2, 4, 8, 16]),
    "full": Settings([8192, 32768], [1, 2, 4, 8, 16], rereads=16),
}


def _prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(f"\n\nQuestion: {question}\nAnswer:", add_special_tokens=False)


def run(bench: Bench, s: Settings) -> str:
    """Measure, write results/<tag>.{json,md,png}, add summary records; returns the markdown."""
    import torch

    from beacon_peft import BeaconMemory
    from beacon_peft.offline.corpora import haystack_ids
    from beacon_peft.reuse import ask, read

    method = bench.beacon_methods([s.ratio])[0]
    offset = random.Random(bench.args.seed).randrange(20000)
    gen = dict(max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=bench.tokenizer.pad_token_id
               or bench.tokenizer.eos_token_id, eos_token_id=None)
    n_questions = max(s.questions)
    rows, checks, contexts = [], [], {}
    with bench.use(method) as model, torch.inference_mode():
        read(model, torch.tensor([haystack_ids(bench.tokenizer, 256, "held_out")]))  # warm-up
        for n in s.lengths:
            ctx = torch.tensor([haystack_ids(bench.tokenizer, n, "held_out", offset=offset)], device=bench.device)
            contexts[n] = ctx[0].tolist()
            t0 = time.perf_counter()
            memory = read(model, ctx)
            measure.sync(bench.device)
            read_s = time.perf_counter() - t0
            answers, ask_s = [], []
            for q in QUESTIONS[:n_questions]:
                qids = torch.tensor([_prompt(bench.tokenizer, q)], device=bench.device)
                t0 = time.perf_counter()
                answers.append(ask(model, memory, qids, **gen)[0].tolist())
                measure.sync(bench.device)
                ask_s.append(time.perf_counter() - t0)
            reread_s = []
            for i, q in enumerate(QUESTIONS[: min(s.rereads, n_questions)]):
                full = torch.cat((ctx, torch.tensor([_prompt(bench.tokenizer, q)], device=bench.device)), 1)
                t0 = time.perf_counter()
                out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **gen)
                measure.sync(bench.device)
                reread_s.append(time.perf_counter() - t0)
                same = out[0, full.shape[1]:].tolist() == answers[i]
                checks.append(dict(context_tokens=n, question=q, identical=same))
                if not same:
                    raise RuntimeError(f"{n} tokens, question {q!r}: re-reading answered "
                                       f"{out[0, full.shape[1]:].tolist()}, the fork {answers[i]}")
            files = {}
            with tempfile.TemporaryDirectory() as tmp:
                for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                    t0 = time.perf_counter()
                    memory.save(Path(tmp) / name, model, dtype=dtype)
                    save_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    BeaconMemory.load(Path(tmp) / name, model)
                    load_s = time.perf_counter() - t0
                    size = sum(p.stat().st_size for p in (Path(tmp) / name).iterdir())
                    files[name] = dict(bytes=size, save_s=save_s, load_s=load_s)
            full_kv = n * kv_bytes_per_entry(bench.config, bench.dtype)
            mean_reread = sum(reread_s) / len(reread_s)
            for q in s.questions:
                measured = reread_s[:q]
                reread_total = sum(measured) + mean_reread * (q - len(measured))
                fork_total = read_s + sum(ask_s[:q])
                rows.append(dict(context_tokens=n, questions=q, read_s=read_s, ask_s_mean=sum(ask_s[:q]) / q,
                                 fork_total_s=fork_total, reread_measured=len(measured), reread_s_mean=mean_reread,
                                 reread_total_s=reread_total, speedup=reread_total / fork_total,
                                 memory_entries=memory.num_entries()[0], memory_bytes=memory.nbytes(),
                                 file_bytes_fp32=files["fp32"]["bytes"], file_bytes_bf16=files["bf16"]["bytes"],
                                 save_s=files["fp32"]["save_s"], load_s=files["fp32"]["load_s"],
                                 full_kv_bytes=full_kv))
    for r in rows:
        m = Method(f"{method.name}-fork-q{r['questions']}", "beacon", s.ratio, adapter=method.adapter)
        for key in ("fork_total_s", "reread_total_s", "speedup", "file_bytes_fp32", "file_bytes_bf16", "full_kv_bytes"):
            bench.record(BENCHMARK, m, r["context_tokens"], key, r[key])
    pipeline = _kvpress_pipeline(bench, s, contexts, gen["max_new_tokens"])
    for r in pipeline:
        m = Method(f"kvpress-snapkv-pipeline-q{r['questions']}", "kvpress", s.ratio)
        bench.record(BENCHMARK, m, r["context_tokens"], "pipeline_total_s", r["total_s"])
    markdown = _tables(bench, s, rows, checks) + _pipeline_table(pipeline)
    out = bench.write(BENCHMARK, dict(settings=vars(s), rows=rows, identical_answers=checks,
                                      kvpress_pipeline=pipeline), markdown)
    _plot(bench, rows, out)
    return markdown


def _kvpress_pipeline(bench: Bench, s: Settings, contexts: dict[int, list[int]], max_new_tokens: int) -> list[dict]:
    """kvpress's own way to answer several questions: ONE full-attention prefill compressed by SnapKV to 1/ratio of
    the KV (``compression_ratio = 1 - 1/ratio``), then every question answered on that cache (truncated back after
    each answer), in the kvpress venv. Only lengths within the base model's positions (full-attention prefill);
    1 and the most questions, timed end to end by the worker (prefill + answers). Empty with --no-kvpress."""
    native = bench.config.max_position_embeddings
    press = [{"name": "snapkv", "compression_ratio": 1 - 1 / s.ratio}]
    measurements = [dict(kind="generate", id=f"{n}-q{q}", presses=press, context_ids=ids, max_new_tokens=max_new_tokens,
                         question_ids=[_prompt(bench.tokenizer, question) for question in QUESTIONS[:q]])
                    for n, ids in contexts.items() if n <= native for q in sorted({1, max(s.questions)})]
    result = bench.kvpress(measurements)
    rows = []
    for m in (result or {}).get("measurements", []):
        rec = m["results"][0]
        if "error" in rec:
            print(f"[reuse] kvpress {m['id']}: {rec['error']}", file=sys.stderr)
            continue
        n, q = (int(x) for x in str(m["id"]).replace("q", "").split("-"))
        rows.append(dict(context_tokens=n, questions=q, total_s=rec["elapsed_s"], kv_bytes=rec.get("kv_bytes")))
    return rows


def _pipeline_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    table = [[report.tokens(r["context_tokens"]), r["questions"], r["total_s"], (r["kv_bytes"] or 0) / MIB]
             for r in rows]
    return ("\n## kvpress's pipeline: one compressed prefill, then every question (SnapKV, same KV budget)\n\n"
            "Run in the kvpress venv (transformers < 5.3); prefill + answers timed end to end.\n\n"
            + report.markdown_table(["tokens", "questions", "total s", "KV MiB held"], table))


def _tables(bench: Bench, s: Settings, rows: list[dict], checks: list[dict]) -> str:
    headers = ["tokens", "questions", "read s", "answer s (mean)", "fork total s", "re-reads measured",
               "re-read total s", "speed-up"]
    table = [[report.tokens(r["context_tokens"]), r["questions"], r["read_s"], r["ask_s_mean"], r["fork_total_s"],
              r["reread_measured"], r["reread_total_s"], r["speedup"]] for r in rows]
    files = {r["context_tokens"]: r for r in rows}
    file_rows = [[report.tokens(n), r["memory_entries"], r["file_bytes_fp32"] / MIB, r["file_bytes_bf16"] / MIB,
                  r["full_kv_bytes"] / MIB, r["full_kv_bytes"] / r["file_bytes_fp32"], r["save_s"], r["load_s"]]
                 for n, r in files.items()]
    same = sum(c["identical"] for c in checks)
    return (f"# Reuse: one read + forks vs re-reading per question ({bench.stem})\n\n{bench.describe()}"
            f"- ratio {s.ratio}; greedy answers of {s.max_new_tokens} tokens; plain `Question: ... Answer:` prompts\n"
            f"- **re-read totals are computed**: re-reading was measured for the first {s.rereads} question(s) per "
            f"length; each further question adds the mean measured re-read time\n"
            f"- answers identical (fork vs re-read) for {same} of {len(checks)} re-read questions\n\n"
            f"{report.markdown_table(headers, table)}\n## The saved memory against a full KV cache\n\n"
            f"{report.markdown_table(FILE_COLUMNS, file_rows)}")


def _plot(bench: Bench, rows: list[dict], out: Path) -> None:
    series = {}
    for n in sorted({r["context_tokens"] for r in rows}):
        pts = [r for r in rows if r["context_tokens"] == n]
        series[f"{report.tokens(n)}: read once + forks"] = ([r["questions"] for r in pts],
                                                              [r["fork_total_s"] for r in pts])
        series[f"{report.tokens(n)}: re-read per question"] = ([r["questions"] for r in pts],
                                                                [r["reread_total_s"] for r in pts])
    report.line_plot(out / f"{bench.stem}_reuse.png", series, xlabel="questions", ylabel="total seconds",
                     title=f"{bench.model_name} on {bench.hardware}", logy=True)


def settings_from(args: argparse.Namespace) -> Settings:
    return with_overrides(SETTINGS[args.mode], lengths=args.lengths, questions=args.questions,
                          rereads=args.rereads, max_new_tokens=args.max_new_tokens, ratio=args.ratio)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (tokens)")
    parser.add_argument("--questions", type=int, nargs="+", help="numbers of questions (totals reported)")
    parser.add_argument("--rereads", type=int, help="questions actually re-read per length (the rest computed)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length")
    parser.add_argument("--ratio", type=int, help="compression ratio (one of the adapter's)")


def main(argv=None) -> int:
    return runner_main(argv, __doc__.splitlines()[0], add_args, settings_from, run,
                       extra_ratios=lambda settings: (settings.ratio,))


if __name__ == "__main__":
    raise SystemExit(main())
