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

The manager owns what a checkpoint holds and how a run resumes (`save`, `resume`); the engine
(experiments.engines) only hands over its weights and optimizer state in the full or the sharded layout and takes
them back from either. Writing: the ranks' collectives first (gathering, or every rank writing its shards into the
temporary folder rank 0 made), then rank 0 writes the rest, the manifest last, and renames the folder into place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from experiments.engines import Engine, FullState, ShardedSource, non_finite
from experiments.trainer_state import (LEGACY_FILE, STATE_FILES, TrainState, load_trainer_state, state_writers)
from moe import sharded_checkpoint
from moe.checkpoint import CONFIG_FILE, commit, read_metadata, read_weights, temporary_folder, write_folder
from moe.config import ModelConfig
from moe.manifest import DamagedCheckpoint, verify
from moe.parallel import same_model

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

    # ---------------------------------------------------------------- what a checkpoint holds

    def last_good(self) -> str:
        """Where a diverged or failed run can continue from, for its error message."""
        found = self.complete()
        return (f"the last good checkpoint is {found[-1][1]}: continue from it with resume=auto and a lower optim.lr"
                if found else
                "no checkpoint of this run was kept; start again with a lower optim.lr")

    def save(self, step: int, engine: Engine, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig,
             train: TrainState, rng: dict[str, Any], sharded: bool, metadata: dict,
             extra: Optional[dict[str, Callable[[Path], None]]] = None) -> Path:
        """Writes step_N (every rank calls it): the engine's weights and optimizer state (refused together on every
        rank when one holds a non-finite tensor), the trainer's state and RNG, config.json with `metadata`, `extra`
        files (a tokenizer), the manifest; then rotation."""
        ranks, path = engine.ranks, self.path(step)
        state = engine.state_to_save(optimizer, sharded, step)
        bad = non_finite(state)
        if ranks.agree(bad is not None):  # every rank refuses together (shards differ between ranks)
            raise FloatingPointError(f"not saving {path}: {bad or 'another rank holds a non-finite tensor'} at step "
                                     f"{step}; {self.last_good()}")
        tmp = Path(ranks.broadcast(str(temporary_folder(path)) if ranks.is_main else None,
                                   "broadcast of the checkpoint's temporary folder"))
        try:
            if isinstance(state, FullState):
                weights, optim = state.weights, state.optimizer
            else:  # every rank writes its pieces; the moments live there, the param groups in trainer_state.json
                sharded_checkpoint.write(tmp / sharded_checkpoint.SHARDED_DIR, state.tensors)
                weights, optim = None, {"state": {}, "param_groups": state.param_groups}
            if ranks.is_main:
                write_folder(tmp, model_cfg, weights, {**state_writers(optim, train, rng), **(extra or {})}, metadata)
                commit(tmp, path)
        except (OSError, RuntimeError) as e:  # disk full, quota, permissions: say where, and what is still safe
            if ranks.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.complete()
            raise OSError(
                f"could not write checkpoint {path} ({type(e).__name__}: {e}); nothing was left half-written"
                + (f" and the previous checkpoint {previous[-1][1]} is intact" if previous else "")
                + "; free space or choose another hydra.run.dir, then resume=auto"
            ) from e
        if ranks.is_main:
            self.rotate()
        ranks.barrier()  # returns once rank 0 has written the checkpoint
        return path

    def resume(self, mode: str, engine: Engine, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
               data_fingerprint: str) -> Optional[tuple[TrainState, dict[str, Any]]]:
        """resume=auto: loads the newest intact checkpoint (of either layout, written at any world size) into the
        engine's model and optimizer; returns its (TrainState, RNG state), or None for a fresh start. A fresh run
        in a directory that holds checkpoints is refused (it would mix two runs), except for a requeued Slurm job."""
        found, ranks = self.complete(), engine.ranks
        if mode != "auto" and found and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            # a requeued Slurm job (preempted, or past its time limit with max_num_timeout) runs its original command
            print(f"Slurm requeued this job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): resuming")
            mode = "auto"
        if mode != "auto":
            if found:
                raise ValueError(
                    f"{self.root.parent} already holds checkpoints of another run ({found[-1][1].name}); continue it "
                    f"with resume=auto, or choose a new directory with hydra.run.dir=..."
                )
            return None
        # rank 0 verifies (and sets damaged ones aside); every rank loads the checkpoint it chose
        chosen = ranks.broadcast(self.newest_intact() if ranks.is_main else None, "broadcast of the chosen checkpoint")
        if chosen is None:
            print(f"resume=auto: no checkpoint in {self.root}, starting from step 0")
            return None
        step, path = chosen
        if step != found[-1][0]:
            print(f"resume=auto: continuing from {path.name}, the newest intact checkpoint")
        saved = read_metadata(path)
        if not same_model(ModelConfig.from_dict(saved["model"]), model.cfg):  # new fields take their defaults
            raise ValueError(
                f"resume=auto: {path} was trained with a different model config; resume with the same overrides, "
                f"or start a new run directory (hydra.run.dir=...)"
            )
        if saved.get("data_fingerprint") != data_fingerprint:
            raise ValueError(f"resume=auto: {path} was trained on different data or a different tokenizer")
        optim, train, rng = load_trainer_state(path, engine.device)
        if sharded_checkpoint.is_sharded(path):
            source = ShardedSource(path / sharded_checkpoint.SHARDED_DIR, optim["param_groups"])
        else:
            source = FullState(read_weights(model, path, verified=True), optim)  # rank 0 verified it above
        engine.load_state(optimizer, source)
        print(f"resumed from {path} at step {step}")
        return train, rng
