"""Writes never leave half a result: the target is the old content or the new, and no temp file lingers."""

import os
import stat

import pytest

from fluxexport.atomic import atomic_file, atomic_folder, write_bytes_atomic, write_text_atomic
from fluxexport.errors import FluxExportError


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_write_text_and_bytes_replace_the_target(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    assert write_text_atomic(target, "new") == target
    assert target.read_text() == "new"
    write_bytes_atomic(target, memoryview(b"\x00\x01"))
    assert target.read_bytes() == b"\x00\x01"
    assert leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_text_atomic(target, b"not text")  # write_text refuses bytes half way through
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="interrupted"), atomic_file(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_file_yields_a_sibling_path(tmp_path):
    with atomic_file(tmp_path / "a.bin") as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".a.bin.")
        temporary.write_bytes(b"x")
    assert (tmp_path / "a.bin").read_bytes() == b"x"


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "config.json").write_text("{}")
        assert not target.exists()
    assert (target / "config.json").read_text() == "{}"

    failed = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt), atomic_folder(failed) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not failed.exists()
    assert leftovers(tmp_path) == []


def test_atomic_folder_refuses_a_non_empty_target(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(FluxExportError) as error, atomic_folder(tmp_path / "model"):
        pass
    assert (
        str(error.value) == f"{tmp_path / 'model'} already exists and is not empty: choose another --out or delete it"
    )
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as staging:  # an empty folder may be replaced
        (staging / "a").write_text("a")
    assert (tmp_path / "empty" / "a").is_file()


def test_written_files_and_folders_get_the_default_mode(tmp_path):
    """Temp files are 0600 and temp folders 0700; what we publish must be readable as a plain write's would be
    (a Triton container often runs as another user)."""
    mask = os.umask(0o022)
    try:
        file = write_text_atomic(tmp_path / "manifest.json", "{}")
        with atomic_folder(tmp_path / "repository") as staging:
            (staging / "config.pbtxt").write_text("")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "repository").stat().st_mode) == 0o755
