"""The scripts behind the lent-GPU runs (scripts/device/): they run where no test runs, so what can be checked here
is: pack.sh's slim tree leaves the repository as it found it, pack.sh never overwrites its carried folders, and
prefill.py's timing loop runs end to end (on the CPU, two layers)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "scripts" / "device" / "pack.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    files = ["adapters/a/adapter_model.safetensors", "tests/fixtures/f.bin", "docs/d.md", "benchmarks/results/s.jsonl",
             "benchmarks/retrieval/results/r.md", "benchmarks/retrieval/run.py", "beacon_peft/keep.py"]
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "toy")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "exclude").write_text("/.venv/\n")
    return repo


def _pack(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PACK), *args], cwd=repo, capture_output=True, text=True)


def test_slim_drops_the_big_folders_from_what_travels_and_unslim_puts_everything_back(tmp_path):
    repo = _toy_repo(tmp_path)
    (repo / "beacon_peft" / "keep.py").write_text("changed")
    _git(repo, "add", "beacon_peft/keep.py")  # a staged change of the developer's own
    tracked = _git(repo, "ls-files").split()

    assert _pack(repo, "slim").returncode == 0
    assert sorted(_git(repo, "ls-files").split()) == ["beacon_peft/keep.py", "benchmarks/retrieval/run.py"]
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    assert "??" not in status  # dropped from the index and ignored: nothing of them travels
    assert (repo / "adapters/a/adapter_model.safetensors").is_file()  # the files themselves stay

    assert _pack(repo, "unslim").returncode == 0
    assert _git(repo, "ls-files").split() == tracked
    assert _git(repo, "diff", "--cached", "--name-only").split() == ["beacon_peft/keep.py"]  # still staged
    assert (repo / ".git" / "info" / "exclude").read_text() == "/.venv/\n"


def test_pack_refuses_to_overwrite_carried_folders_and_unknown_modes(tmp_path):
    repo = _toy_repo(tmp_path)
    (repo / ".gpu" / "a").mkdir(parents=True)
    (repo / ".gpu" / "a" / "mine.whl").write_text("kept")
    done = _pack(repo)
    assert done.returncode == 1 and ".gpu/a exists" in done.stderr
    assert (repo / ".gpu" / "a" / "mine.whl").read_text() == "kept"
    bad = _pack(repo, "slimm")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_prefill_script_times_full_attention_and_beacon_side_by_side_on_the_cpu(tmp_path):
    out = tmp_path / "prefill.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device" / "prefill.py"), "--device", "cpu",
                           "--layers", "2", "--lengths", "300", "--window", "128", "--repeats", "1", "--n-decode", "2",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 300 |" in done.stdout
    import json

    rows = json.loads(out.read_text())
    full, beacon = rows[0]["full"], rows[0]["beacon"]
    assert full["kv_entries"] == 300
    assert beacon["kv_entries"] < full["kv_entries"]  # two windows of 128 compressed at ratio 8
    assert full["prefill_s"] > 0 and beacon["prefill_s"] > 0


def test_prefill_script_refuses_cuda_when_there_is_none():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the refusal is for machines without one")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device" / "prefill.py"), "--lengths", "64"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "none is visible" in done.stderr


def test_grouped_device_script_runs_every_part_on_the_cpu(tmp_path):
    """scripts/device/grouped.py end to end on tiny sizes: prefill (full vs grouped vs window loop), the 4-bit
    (bitsandbytes) training step beside a LoRA step, and the read-back throughput by batch."""
    import json

    out = tmp_path / "grouped.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device" / "grouped.py"), "--device", "cpu",
                           "--quick", "--shapes", "tiny", "--lengths", "300", "--window", "64", "--repeats", "1",
                           "--n-decode", "2", "--max-batch", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prefill = {r["method"]: r for r in rows if r["part"] == "prefill"}
    assert set(prefill) == {"full", "grouped", "loop"}
    assert prefill["grouped"]["kv_mib"] == prefill["loop"]["kv_mib"] < prefill["full"]["kv_mib"]
    qlora = [r for r in rows if r["part"] == "qlora"]
    assert {r["method"] for r in qlora} == {"beacon", "lora-full"} and all(r["tokens_per_s"] for r in qlora)
    readback = [r for r in rows if r["part"] == "readback"]
    assert {r["method"] for r in readback} == {"grouped", "loop"} and all(r["tokens_per_s"] for r in readback)
