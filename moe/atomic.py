"""Writing files and folders atomically: under a temporary name beside the target, renamed into place.

A crash at any point (or a second process writing the same entry) leaves the old version or the new one, never
half of one: a rename within one directory is atomic on POSIX file systems. Every writer of the tree goes through
here (checkpoints, exported models, the data and tokenizer caches, metrics.jsonl, run.json), so the temporary
names, the permissions and the clean-up on error are the same everywhere.

    write_text(path, text)                    one file
    with write_atomically(path) as tmp: ...   a folder: fill tmp, it replaces path on success
    temporary_folder(path) + commit(tmp, path)   the same in two steps (ranks filling one folder together)

Temporary names start with `.{name}.tmp-`, so a checkpoint manager can recognise and remove leftovers.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary file in the same directory, renamed into place; the
    file gets the permissions of any new file (the umask applies), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def write_atomically(path: str | os.PathLike, replace_existing: bool = True) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it takes the place of `path` (commit), on any error it
    is removed and `path` is left as it was. replace_existing=False: a cache entry, where a `path` that another
    process finished first wins and this copy is discarded."""
    path = Path(path)
    tmp = temporary_folder(path)
    try:
        yield tmp
        commit(tmp, path, replace_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a commit; the half-written folder otherwise


def temporary_folder(path: str | os.PathLike) -> Path:
    """A new empty folder beside `path`, named `.{name}.tmp-XXXX` (recognisable as a leftover)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def commit(tmp: Path, path: Path, replace_existing: bool = True) -> None:
    """Puts the finished folder `tmp` in place of `path` by renames, with plain permissions.

    replace_existing: an existing `path` is moved aside, `tmp` renamed in, then the old one removed, so a crash
    leaves the old folder or the new one. False: `path` is kept if it exists (rename refuses a non-empty target)
    and `tmp` is removed."""
    tmp, path = Path(tmp), Path(path)
    _plain_permissions(tmp)
    if path.exists() and replace_existing:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, path)
    except OSError:
        if replace_existing or not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same entry first


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _plain_permissions(folder: Path) -> None:
    """Every file and folder readable like any other (umask applies): mkdtemp makes the folder private and some
    writers (safetensors) create their files 0600, which would leave siblings differing."""
    umask = _umask()
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


__all__ = ["commit", "temporary_folder", "write_atomically", "write_text"]
