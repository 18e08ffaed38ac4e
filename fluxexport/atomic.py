"""Writes that never leave half a result: a staging folder or temp file beside the target, then a rename.

`atomic_file` replaces one file, `atomic_folder` makes one folder, `staged_files` replaces a set of files in a
folder that already holds others (a graph and its weights beside the manifest and the other graphs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


STAGING_PREFIX = ".staging-"  # staging folders inside a target folder: `.staging-<what>-<random>`
_REPLACED = ".replaced"  # inside a staging folder: links to the files being replaced, until the swap is done


@contextmanager
def staged_files(folder: Path, what: str, last: str | None = None, stale: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder inside `folder` (same file system: renames are atomic). When the block
    succeeds, every file written there replaces its namesake in `folder`, `last` (the file that says the set is
    complete: a graph after its weights) after the others; then the `stale` names the new set lacks (an earlier
    set's data file) are removed. If the block or the swap fails, `folder` is left as it was: files already
    swapped get their old content back. The staging folder is removed either way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f"{STAGING_PREFIX}{what}-"))
    try:
        yield staging
        names = sorted(path.name for path in staging.iterdir())
        if last in names:
            names.append(names.pop(names.index(last)))
        _swap_in(staging, folder, names, [name for name in stale if name not in names])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, folder: Path, names: list[str], stale: list[str]) -> None:
    """Move `names` from `staging` into `folder` in order, then remove `stale` from `folder`; on any failure
    undo the moves and removals done so far (the old files were kept in `staging/.replaced`)."""
    kept = staging / _REPLACED
    done: list[tuple[str, Path | None]] = []  # (name, where its old file is kept; None: there was none)
    try:
        for name in names:
            old = _keep(folder / name, kept)
            try:
                os.replace(staging / name, folder / name)
            except BaseException:
                if old is not None:  # moved aside (no hard links here): put it back
                    os.replace(old, folder / name)
                raise
            done.append((name, old))
        for name in stale:
            if (folder / name).is_file():
                done.append((name, _keep(folder / name, kept, move=True)))
    except BaseException:
        for name, old in reversed(done):
            if old is None:
                (folder / name).unlink(missing_ok=True)
            else:
                os.replace(old, folder / name)
        raise


def _keep(path: Path, kept: Path, move: bool = False) -> Path | None:
    """Keep the file at `path` in `kept` (a hard link, or the file itself when `move` or links are not
    supported) so that it can be put back; None when there is no file."""
    if not path.is_file():
        return None
    kept.mkdir(exist_ok=True)
    if not move:
        try:
            os.link(path, kept / path.name)
            return kept / path.name
        except OSError:
            pass
    os.replace(path, kept / path.name)
    return kept / path.name
