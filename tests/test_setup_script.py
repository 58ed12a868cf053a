"""scripts/setup.sh refuses what it cannot install as the README promises, before creating or changing anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYENV = Path("/root/.pyenv/versions")
OTHER_PYTHON = next(iter(PYENV.glob("3.12*/bin/python3.12")), None) or shutil.which("python3.12")


def _setup(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "VENV": str(tmp_path / "venv"), **env})


def test_unknown_torch_build_is_refused(tmp_path):
    done = _setup(tmp_path, TORCH="rocm")
    assert done.returncode == 2
    assert "TORCH=rocm is not a torch build: allowed cpu, cuda, auto" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.skipif(OTHER_PYTHON is None, reason="no Python 3.12 interpreter on this machine to try")
def test_python_other_than_the_locked_one_is_refused(tmp_path):
    done = _setup(tmp_path, PYTHON=str(OTHER_PYTHON), TORCH="cpu")
    assert done.returncode == 2
    assert "is Python 3.12; beacon_peft is locked and tested on Python 3.11" in done.stderr
    assert "PYTHON=python3.11 bash scripts/setup.sh" in done.stderr
    assert not (tmp_path / "venv").exists()
