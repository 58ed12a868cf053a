"""The separate kvpress venv, and running ``kvpress_worker.py`` inside it.

kvpress 0.5.5 needs ``transformers<5.3`` while beacon_peft needs transformers 5.2x, so kvpress
lives in its own venv (default ``$BEACON_PEFT_CACHE/kvpress-venv``, else
``~/.cache/beacon_peft/kvpress-venv``; ``BEACON_PEFT_KVPRESS_VENV`` overrides the path) that is
created once, on demand, and driven as a subprocess:

    from benchmarks.common.kvpress_env import run_kvpress_job, kvpress_unavailable_reason
    if (why := kvpress_unavailable_reason()) is None:
        result = run_kvpress_job({"model_dir": d, "measurements": [...]})

Install recipe: ``pip install torch==2.13.0`` first (a CPU wheel; a dry run refuses a build
that would pull ``nvidia-*`` CUDA packages), then ``pip install kvpress==0.5.5 torch==<that
version>`` so pip cannot swap torch; pip then resolves transformers 5.2.x. Extra pip arguments
(e.g. ``--extra-index-url https://download.pytorch.org/whl/cpu`` on a machine without a local
CPU wheel) come from ``BEACON_PEFT_KVPRESS_PIP_ARGS``. A marker file records the versions; a
venv without it is rebuilt. See ``kvpress_worker`` for the job/result JSON schema.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KVPRESS_SPEC = "kvpress==0.5.5"
TORCH_SPEC = "torch==2.13.0"
MARKER = ".beacon_kvpress_ok.json"
WORKER = Path(__file__).resolve().parent / "kvpress_worker.py"
_VERSIONS_SCRIPT = (
    "import json, importlib.metadata as m, kvpress, torch\n"
    "v = {n: m.version(n) for n in ('kvpress', 'transformers', 'torch')}\n"
    "v['cuda'] = torch.version.cuda\n"
    "print(json.dumps(v))\n"
)
_failed: dict[str, str] = {}  # venv path -> reason, so one process does not retry a failed install


class KvpressUnavailable(RuntimeError):
    """The kvpress venv could not be created (offline, pip failure, CUDA-only torch...)."""


def default_venv_path() -> Path:
    if os.environ.get("BEACON_PEFT_KVPRESS_VENV"):
        return Path(os.environ["BEACON_PEFT_KVPRESS_VENV"]).expanduser()
    cache = os.environ.get("BEACON_PEFT_CACHE") or "~/.cache/beacon_peft"
    return Path(cache).expanduser() / "kvpress-venv"


def venv_python(path: str | os.PathLike | None = None) -> Path:
    return Path(path or default_venv_path()) / "bin" / "python"


def _log(msg: str) -> None:
    print(f"[beacon_peft] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise KvpressUnavailable(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return proc.stdout


def _check_torch_is_cpu(py: Path, pip_args: list[str]) -> None:
    """Dry-run the torch install and refuse one that would pull CUDA packages."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _run([str(py), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
              TORCH_SPEC, *pip_args], f"resolving {TORCH_SPEC}")
        items = json.loads(report.read_text()).get("install", [])
    names = [i["metadata"]["name"].lower() for i in items]
    cuda = [n for n in names if n.startswith("nvidia-") or n == "triton"]
    if cuda:
        raise KvpressUnavailable(
            f"pip would install a CUDA build of {TORCH_SPEC} (pulls {', '.join(cuda[:4])}...); refusing. "
            "Provide a CPU wheel, e.g. BEACON_PEFT_KVPRESS_PIP_ARGS="
            "'--extra-index-url https://download.pytorch.org/whl/cpu'"
        )


def ensure_kvpress_venv(path: str | os.PathLike | None = None) -> Path:
    """Create (once; idempotent, guarded by a file lock) the kvpress venv and return its path.

    Raises ``KvpressUnavailable`` with pip's output tail when it cannot be built.
    """
    path = Path(path or default_venv_path()).expanduser().absolute()
    marker = path / MARKER
    if marker.exists() and venv_python(path).exists():
        return path
    if str(path) in _failed:
        raise KvpressUnavailable(_failed[str(path)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent creator finishes first, then we see its marker
        if marker.exists() and venv_python(path).exists():
            return path
        t0 = time.monotonic()
        _log(f"creating the kvpress venv at {path} (one time, ~1-2 min: {TORCH_SPEC} CPU + {KVPRESS_SPEC})")
        pip_args = shlex.split(os.environ.get("BEACON_PEFT_KVPRESS_PIP_ARGS", ""))
        try:
            if path.exists():
                shutil.rmtree(path)  # half-built leftover
            _run([sys.executable, "-m", "venv", str(path)], "creating the venv")
            py = venv_python(path)
            _log(f"  resolving and installing {TORCH_SPEC} ...")
            _check_torch_is_cpu(py, pip_args)
            _run([str(py), "-m", "pip", "install", "--quiet", TORCH_SPEC, *pip_args], f"installing {TORCH_SPEC}")
            torch_version = _run([str(py), "-c", "import torch; print(torch.__version__)"], "importing torch").strip()
            _log(f"  torch {torch_version} installed ({time.monotonic() - t0:.0f}s); installing {KVPRESS_SPEC} ...")
            _run([str(py), "-m", "pip", "install", "--quiet", KVPRESS_SPEC, f"torch=={torch_version}", *pip_args],
                 f"installing {KVPRESS_SPEC}")
            versions = json.loads(_run([str(py), "-c", _VERSIONS_SCRIPT], "importing kvpress"))
        except KvpressUnavailable as e:
            _failed[str(path)] = str(e)
            shutil.rmtree(path, ignore_errors=True)
            raise
        versions["created_s"] = round(time.monotonic() - t0, 1)
        marker.write_text(json.dumps(versions))
        _log(f"kvpress venv ready in {versions['created_s']:.0f}s: {versions}")
    return path


def kvpress_versions(path: str | os.PathLike | None = None) -> dict | None:
    """Versions recorded when the venv was built (None when there is no finished venv)."""
    marker = Path(path or default_venv_path()).expanduser() / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def kvpress_unavailable_reason(path: str | os.PathLike | None = None, create: bool = True) -> str | None:
    """None when kvpress can be used; otherwise a one-paragraph reason (after trying to create
    the venv, unless ``create=False``). For benchmark runners to skip the kvpress methods."""
    try:
        if create:
            ensure_kvpress_venv(path)
        elif kvpress_versions(path) is None:
            return f"no kvpress venv at {Path(path or default_venv_path())} (create=False)"
        return None
    except KvpressUnavailable as e:
        return f"kvpress unavailable (could not build its venv; offline or pip failure?): {e}"


def run_kvpress_job(job: dict, timeout: float | None = None, *, venv: str | os.PathLike | None = None,
                    check: bool = True, echo: bool = True) -> dict:
    """Run one job (schema in ``kvpress_worker``) in the kvpress venv and return its result.

    The worker's stdout/stderr (progress lines) are echoed to our stderr when ``echo``. Raises
    ``RuntimeError`` with the output tail when the worker fails or exceeds ``timeout`` seconds,
    and, when ``check``, if any press reported an error.
    """
    py = venv_python(ensure_kvpress_venv(venv))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with tempfile.TemporaryDirectory(prefix="kvpress-job-") as tmp:
        job_path, res_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # never leak the main venv's packages into the worker
        env.pop("PYTHONSAFEPATH", None)  # the worker imports its sibling metrics.py from its own folder
        proc = subprocess.Popen([str(py), str(WORKER), str(job_path), str(res_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")

        def pump() -> None:
            for line in proc.stdout:
                tail.append(line)
                if echo:
                    sys.stderr.write(line)
                    sys.stderr.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            raise RuntimeError(f"kvpress worker timed out after {timeout}s; output tail:\n{''.join(tail)}") from None
        reader.join(5)
        if rc != 0 or not res_path.exists():
            raise RuntimeError(f"kvpress worker failed (exit {rc}); output tail:\n{''.join(tail)}")
        result = json.loads(res_path.read_text())
    if check:
        errors = [f"{m['kind']}#{m['id']} {r['press']}@{r['compression_ratio']}: {r['error']}"
                  for m in result["measurements"] for r in m["results"] if "error" in r]
        if errors:
            raise RuntimeError("kvpress worker reported press errors:\n" + "\n".join(errors))
    return result
