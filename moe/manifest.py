"""The manifest of a checkpoint directory: every file's size and SHA-256, written last.

A checkpoint is written under a temporary name and renamed into place (moe.atomic.write_atomically), so a
crash never leaves half of one; the manifest guards against what happens to the bytes afterwards (a flipped
sector, a truncated copy, a file replaced by another run's). Readers verify the files they are about to trust
and a mismatch names the file, so a trainer can fall back to an older checkpoint instead of training on noise.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, Optional

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint file whose bytes differ from its manifest (or a manifest that cannot be read)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Records every file of `folder` (recursively, manifest excepted). Call it after the last file is written."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def read_manifest(folder: Path) -> Optional[dict]:
    """The manifest's file table, or None for a checkpoint written before manifests existed."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(path, f"the manifest cannot be read ({type(e).__name__}: {e})") from None
    return files


def verify(folder: str | Path, names: Optional[Iterable[str]] = None) -> None:
    """Checks the size and SHA-256 of `names` (every file the manifest lists when None) against the manifest.

    Raises DamagedCheckpoint naming the first file that differs or is missing. A folder without a manifest
    (written by an older Switchyard) is accepted with a warning: there is nothing to check it against.
    """
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        warnings.warn(f"{folder} has no {MANIFEST_FILE} (written by an older Switchyard): its files cannot be "
                      f"verified", stacklevel=2)
        return
    for name in (sorted(files) if names is None else names):
        path = folder / name
        entry = files.get(name)
        if entry is None:
            if path.exists():
                raise DamagedCheckpoint(path, f"the file is not listed in {MANIFEST_FILE}")
            continue  # an optional file this checkpoint does not have (e.g. no tokenizer)
        if not path.is_file():
            raise DamagedCheckpoint(path, f"the file is missing ({MANIFEST_FILE} lists it)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise DamagedCheckpoint(path, f"{size} bytes, but {MANIFEST_FILE} records {entry['size']}")
        if sha256(path) != entry["sha256"]:
            raise DamagedCheckpoint(path, f"its SHA-256 differs from the one in {MANIFEST_FILE}: the bytes changed "
                                          f"after the checkpoint was written")
