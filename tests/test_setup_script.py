"""scripts/setup.sh refuses what it cannot install as the README promises, before creating or changing anything, and
accepts every Python pyproject.toml declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYENV = Path("/root/.pyenv/versions")


def _python(version: str) -> Path | None:
    """An interpreter of that version on this machine (pyenv's or PATH's), or None."""
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}")) or [shutil.which(f"python{version}")]
    return Path(found[-1]) if found[-1] else None


def _setup(tmp_path, venv=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "VENV": str(venv or tmp_path / "venv"), **env})


def _tested_pythons() -> list[str]:
    line = re.search(r'^TESTED_PYTHONS="([0-9. ]+)"', (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    return line.group(1).split()


def test_unknown_torch_build_is_refused(tmp_path):
    done = _setup(tmp_path, TORCH="rocm")
    assert done.returncode == 2
    assert "TORCH=rocm is not a torch build: allowed cpu, cuda, auto" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_the_declared_pythons_agree():
    """setup.sh's tested Pythons are pyproject's classifiers, the oldest is requires-python's bound (no upper cap)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    classified = [c.rsplit(" :: ", 1)[1] for c in meta["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.[0-9]+", c)]
    assert classified == _tested_pythons()
    assert meta["requires-python"] == f">={classified[0]}"
    lock_header = (ROOT / "requirements" / "lock.txt").read_text().splitlines()[0]
    assert f"Python {', '.join(classified)}," in lock_header


@pytest.mark.skipif(_python("3.10") is None, reason="no Python 3.10 interpreter on this machine to try")
def test_python_older_than_declared_is_refused(tmp_path):
    done = _setup(tmp_path, PYTHON=str(_python("3.10")), TORCH="cpu")
    assert done.returncode == 2
    assert "is Python 3.10; beacon_peft needs Python 3.11 or newer" in done.stderr
    assert "PYTHON=python3.12 bash scripts/setup.sh" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_a_missing_interpreter_is_refused(tmp_path):
    done = _setup(tmp_path, PYTHON=str(tmp_path / "no-python"), TORCH="cpu")
    assert done.returncode == 2 and "is not a Python interpreter that runs" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13"])
def test_every_declared_python_is_accepted(tmp_path, version):
    """Past the interpreter check to the creation of the environment (made to fail at once: its parent is a file,
    so nothing is installed)."""
    python = _python(version)
    if python is None:
        pytest.skip(f"no Python {version} interpreter on this machine to try")
    (tmp_path / "file").write_text("")
    done = _setup(tmp_path, venv=tmp_path / "file" / "venv", PYTHON=str(python), TORCH="cpu")
    assert "setup: creating" in done.stderr and "needs Python" not in done.stderr and "note:" not in done.stderr
    assert done.returncode not in (0, 2)  # the venv module's own failure


def test_a_newer_python_than_tested_is_let_through_with_a_note(tmp_path):
    """A Python newer than the tested ones (a stand-in answering 3.99 to setup.sh's two questions) is accepted, with
    a note naming the tested ones."""
    fake = tmp_path / "python3.99"
    fake.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.99 ;; *sys.exit*) exit 0 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    done = _setup(tmp_path, PYTHON=str(fake), TORCH="cpu")
    tested = ", ".join(_tested_pythons())
    assert f"note: Python 3.99 is newer than the Pythons the suite has passed on ({tested})" in done.stderr
    assert "setup: creating" in done.stderr and done.returncode not in (0, 2)


@pytest.mark.parametrize("args, message", [
    ([], "usage: bash scripts/pythons.sh"), (["3.x"], "usage: bash scripts/pythons.sh"),
    (["3.99"], "no Python 3.99 here (python3.99 on PATH or under pyenv)")])
def test_pythons_script_refuses_what_it_cannot_run(args, message):
    """scripts/pythons.sh (the lock on other Pythons) refuses a bad version or one not on this machine, before any
    environment is made."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "pythons.sh"), *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and message in done.stderr
    assert not (ROOT / ".venv-py399").exists()
