"""The checkpoint manager of a training run: which checkpoints exist, which one to resume, rotation, leftovers.

RUN_DIR/checkpoints/ holds `step_N/` directories (moe.checkpoint: weights, config, tokenizer, the trainer's state
and a manifest). Around them:
- `.step_N.tmp-*`, `.step_N.old-*` and `.step_N.trash-*` are what a crash leaves of a write or a removal in
  progress; they are removed when the next run in the directory starts;
- `step_N.damaged/` is a checkpoint whose files failed verification, set aside when a resume fell back past it;
- `step_N.diverged/` holds weights whose gradients were not finite for trainer.max_skipped_steps steps in a row.
Neither of the last two is ever resumed or rotated away: they are kept for a person to look at.

Rotation keeps the newest trainer.keep_checkpoints checkpoints and removes a checkpoint by renaming it to a
temporary name first, so a crash during the removal never leaves a half checkpoint under a resumable name.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from experiments.trainer_state import LEGACY_FILE, STATE_FILES
from moe.checkpoint import CONFIG_FILE
from moe.manifest import DamagedCheckpoint, verify

CHECKPOINTS = "checkpoints"
LEFTOVER_MARKS = (".tmp-", ".old-", ".trash-")


def step_of(path: Path) -> Optional[int]:
    """N for a folder named step_N, else None."""
    prefix, _, number = path.name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep = keep  # checkpoints kept by rotation (trainer.keep_checkpoints)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def complete(self) -> list[tuple[int, Path]]:
        """Checkpoints under a resumable name, oldest first (a legacy pickled one is listed so resume can refuse it
        by name)."""
        found = []
        for p in self.root.iterdir() if self.root.is_dir() else []:
            step = step_of(p)
            has_state = all((p / n).is_file() for n in STATE_FILES) or (p / LEGACY_FILE).is_file()
            if step is not None and p.is_dir() and has_state and (p / CONFIG_FILE).is_file():
                found.append((step, p))
        return sorted(found)

    def remove_leftovers(self) -> list[str]:
        """Removes what crashed writes and removals left behind; returns their names."""
        removed = []
        for p in self.root.iterdir() if self.root.is_dir() else []:
            if p.name.startswith(".step_") and any(mark in p.name for mark in LEFTOVER_MARKS):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def newest_intact(self, warn: Callable[[str], None] = print) -> Optional[tuple[int, Path]]:
        """The newest checkpoint whose files match its manifest. A damaged newer one is named, set aside as
        step_N.damaged, and the next older one tried; None when there is no checkpoint at all. When every
        checkpoint is damaged, a ValueError lists them."""
        found = self.complete()
        damaged = []
        for step, path in reversed(found):
            try:
                verify(path)
                return step, path
            except DamagedCheckpoint as e:
                damaged.append(str(e))
                aside = self.set_aside(step, "damaged")
                older = "no older checkpoint is left" if len(damaged) == len(found) else "trying the previous one"
                warn(f"checkpoint {path.name} is damaged: {e.path.name}: {e.reason}; moved to {aside.name}, {older}")
        if damaged:
            raise ValueError(f"every checkpoint in {self.root} is damaged ({'; '.join(damaged)}); start a new run "
                             f"or restore a copy")
        return None

    def set_aside(self, step: int, why: str) -> Path:
        """Renames step_N to step_N.<why> (a name resume and rotation skip); a same-named earlier one is replaced."""
        target = self.root / f"step_{step}.{why}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(self.path(step), target)
        return target

    def rotate(self) -> None:
        """Keeps the newest `keep` checkpoints. Called right after a save, so the newest one, just written and
        verified by construction, is never among those removed."""
        for _, old in self.complete()[: -self.keep]:
            trash = old.with_name(f".{old.name}.trash-{os.getpid()}")
            os.replace(old, trash)  # atomic: the checkpoint is gone from the resumable names at once
            shutil.rmtree(trash, ignore_errors=True)
