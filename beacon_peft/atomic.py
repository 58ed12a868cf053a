"""Writing a folder atomically: the one writer behind every folder the package produces.

A converted adapter or base model (`convert`), the final adapter of a training run (`training.saving`), a saved
memory (`memory_file`), the SmolLM2 cache (`offline.weights`) and the read-back recipe's checkpoint are all written
by `write_dir`: into a temporary sibling folder first, renamed into place only once complete. An interruption
therefore leaves the previous folder or the new one, never a half-written one. `refuse_earlier_run` keeps a
training run from writing over an earlier run's folder unasked.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]

__all__ = ["refuse_earlier_run", "write_dir"]


def refuse_earlier_run(output_dir: PathLike, found: list[str], resume_flag: str, overwrite_flag: str) -> None:
    """A fresh training run must not write over (or, by rotating checkpoints, delete) an earlier run's files: a
    ValueError naming what ``output_dir`` holds of one (``found``) and the flags that continue or replace it."""
    if found:
        raise ValueError(f"output_dir={output_dir} holds an earlier run ({', '.join(found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): allowed {resume_flag} to continue it, "
                         f"{overwrite_flag} to replace it, or another --output_dir")


def _refuse(final: Path, overwrite: bool) -> None:
    """Raise when ``final`` is something `write_dir` may not replace."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise FileExistsError(f"{final} exists and is not a folder: a folder is written only where there is none "
                              "or an existing folder")
    if not overwrite and final.is_dir() and any(final.iterdir()):
        raise FileExistsError(f"{final} is a non-empty folder: it is replaced only with overwrite=True")


def _sibling(final: Path, tag: str) -> Path:
    """Create a new, empty hidden sibling folder of ``final`` (plain ``mkdir``: permissions follow the umask)."""
    while True:
        path = final.parent / f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _fsync_files(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so the rename never publishes data still in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_dir(final: PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a new temporary sibling folder of ``final``, then rename it to ``final``.

    What may be at ``final``:

    * nothing, or an empty folder: taken;
    * a non-empty folder: replaced only with ``overwrite`` (`FileExistsError` otherwise, checked before ``write``
      runs and again before the rename); the old folder is moved aside, deleted once the new one is in place, and
      moved back if the rename fails;
    * a file or a symbolic link: never replaced (`FileExistsError`).

    On any failure or interruption (``KeyboardInterrupt`` included) the temporary folder is deleted and ``final``
    is as it was. The new folder has the permissions of a plain ``mkdir`` (the umask's), and its files are flushed
    to disk before the rename.

    Returns:
        ``final`` as a `Path`.
    """
    final = Path(final)
    _refuse(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    try:
        write(tmp)
        _fsync_files(tmp)
        _refuse(final, overwrite)  # something may have appeared there while ``write`` ran
        if not final.exists():
            os.replace(tmp, final)
            return final
        holder = _sibling(final, "old")  # the old folder waits here until the new one is in place
        moved = False
        try:
            os.replace(final, holder / final.name)
            moved = True
            os.replace(tmp, final)
        except BaseException:
            if moved:
                os.replace(holder / final.name, final)  # should this fail too, the old folder stays in holder
            holder.rmdir()
            raise
        shutil.rmtree(holder, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
