"""Writes that never leave half a result: a staging folder or temp file beside the target, then a rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fluxexport.errors import FluxExportError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_default_mode(path: Path, folder: bool = False) -> Path:
    """Give a temp file (mkstemp: 0600) or folder (mkdtemp: 0700) the mode a plain open() or mkdir() would:
    a Triton container running as another user must be able to read what we write."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
    return path


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a staging folder next to `target`; on success it becomes `target` (which must be absent or empty)."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FluxExportError(f"{target} already exists and is not empty: choose another --out or delete it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield with_default_mode(staging, folder=True)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield with_default_mode(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> Path:
    """Replace `path` with `data` through a temporary file in the same folder."""
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """Replace `path` with `text` through a temporary file in the same folder."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)
    return Path(path)
