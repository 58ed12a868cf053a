"""beacon_peft.atomic.write_dir: the one folder writer (temporary sibling, then rename; nothing replaced unasked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from beacon_peft import atomic
from beacon_peft.atomic import write_dir


def put(text: str):
    def write(folder: Path) -> None:
        (folder / "a.txt").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text(text)

    return write


def test_new_and_empty_folders_are_taken(tmp_path):
    assert write_dir(tmp_path / "deep" / "new", put("1")) == tmp_path / "deep" / "new"
    assert (tmp_path / "deep" / "new" / "sub" / "b.txt").read_text() == "1"
    (tmp_path / "empty").mkdir()
    write_dir(tmp_path / "empty", put("2"))
    assert (tmp_path / "empty" / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "empty"]


def test_a_non_empty_folder_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    write_dir(out, put("1"))
    (out / "mine.txt").write_text("user file")
    called = []
    with pytest.raises(FileExistsError, match="non-empty folder"):
        write_dir(out, lambda f: called.append(f))
    assert not called and (out / "mine.txt").exists()  # refused before writing anything
    write_dir(out, put("2"), overwrite=True)
    assert (out / "a.txt").read_text() == "2" and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_or_link_is_never_replaced(tmp_path, overwrite):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_dir(tmp_path / "file", put("x"), overwrite=overwrite)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_dir(tmp_path / "link", put("x"), overwrite=overwrite)
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "link").is_symlink()


def test_an_interrupted_write_leaves_the_previous_folder_and_no_temporary_one(tmp_path):
    out = tmp_path / "out"
    write_dir(out, put("1"))

    def interrupted(folder: Path) -> None:
        (folder / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir(out, interrupted, overwrite=True)
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_dir(out, put("1"))
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        write_dir(out, put("2"), overwrite=True)
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_folder_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    old = os.umask(0o022)
    try:
        write_dir(tmp_path / "out", put("1"))
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755
