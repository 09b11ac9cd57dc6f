"""The training loop: batches, AdamW, schedule, clipping, accumulation, evaluation, metrics, checkpoints,
exact resumption, non-finite steps and preemption.

Exact resumption rests on three things: batches are a pure function of (seed, step) (experiments.data),
the checkpoint holds the optimizer state and the RNG state at the step boundary, and the metrics file is cut
back to the checkpoint's step. On CPU a resumed run reproduces the uninterrupted run's losses bit for bit.

What a run guarantees about its checkpoints (experiments.checkpoints, experiments.trainer_state, moe.manifest):
nothing in them is a pickle; every file is verified against the manifest before it is trusted, and a damaged
newest checkpoint is named and passed over for the newest intact one; a step whose gradient norm is not finite
updates nothing (trainer.max_skipped_steps in a row stop the run, naming the last good checkpoint), and only
finite weights and optimizer state are written; SIGTERM / SIGUSR1 / submitit's signal finish the step, save it
and stop (experiments.preemption).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from experiments.checkpoints import CheckpointManager
from experiments.config import RunConfig
from experiments.data import PreparedData, describe, prepare
from experiments.distributed import NullLogger, setup_parallel
from experiments.metrics import METRICS_FILE, MetricsLogger, flatten_stats, routing_summary
from experiments.optim import build_optimizer, lr_at
from experiments.preemption import Preempted, PreemptionFlag
from experiments.tokenizer import load_tokenizer
from experiments.trainer_state import TrainState, load_trainer_state, rng_state, set_rng_state, state_writers
from moe.checkpoint import load_config, load_weights, read_metadata, save_checkpoint
from moe.dispatch import describe_dispatch
from moe.flops import count_params, flops_per_token
from moe.config import ModelConfig
from moe.model import Transformer
from moe.parallel import same_model
from routing.router import Router
from routing.stats import CollapseMonitor

RUN_FILE = "run.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available; use trainer.device=cpu")
    return device


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in run_dir/checkpoints, oldest first (experiments.checkpoints)."""
    return CheckpointManager(run_dir, keep=1).complete()


class Trainer:
    def __init__(self, cfg: RunConfig, data: Optional[PreparedData] = None):
        self.cfg = cfg
        tc = cfg.trainer
        self.par = setup_parallel(cfg)  # trainer=ddp: checks the settings, then joins torchrun's process group
        self.run_dir = Path(self.par.broadcast(str(cfg.path)))  # rank 0's directory for every rank
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpts = CheckpointManager(self.run_dir, tc.keep_checkpoints)
        if self.par.is_main:
            for name in self.ckpts.remove_leftovers():
                print(f"removed {name}: left in {self.ckpts.root} by an interrupted write")
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = self.par.local_device(resolve_device(tc.device))
        self.data = data or self.par.main_first(lambda: prepare(cfg.data, tokenizer=_checkpoint_tokenizer(cfg.init_from)))
        self.model_cfg = self._model_config()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = Transformer(self.model_cfg)
        if cfg.init_from:
            load_weights(self.model, cfg.init_from)
        self.model.to(self.device)
        self.par.distribute(self.model)  # expert parallelism: keeps this rank's experts (before the optimizer)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.state = TrainState()
        bf16 = tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.params = count_params(self.model_cfg)
        self.flops_per_token = flops_per_token(self.model_cfg, tc.seq_len).training
        self.val_set = [self.par.local_rows(*b) for b in self.data.val_batches(tc.batch_size, tc.seq_len, tc.eval_batches)]
        self._step_rng = rng_state()
        self.collapse = CollapseMonitor()
        self.preemption = PreemptionFlag()
        resumed = self._maybe_resume()
        self.optimizer = self.par.prepare(self.model, self.optimizer)  # trainer=deepspeed: the engine, from here on
        self.logger = (MetricsLogger(self.run_dir, cfg.logger, cfg.to_dict(), resume_step=self.state.step if resumed else None)
                       if self.par.is_main else NullLogger(self.run_dir / METRICS_FILE))

    def _model_config(self):
        """The model to train: the checkpoint's for init_from, else the composed one sized to the tokenizer."""
        if self.cfg.init_from:
            mcfg = load_config(self.cfg.init_from)
            # how many ranks share the experts is this run's choice, not the checkpoint's
            mcfg = mcfg.replace(moe=dataclasses.replace(mcfg.moe, expert_parallel=self.cfg.model.moe.expert_parallel))
            if mcfg.vocab_size < self.data.vocab_size:
                raise ValueError(
                    f"init_from={self.cfg.init_from} has a vocabulary of {mcfg.vocab_size} but the data's tokenizer "
                    f"has {self.data.vocab_size}; tokenize the data with the checkpoint's tokenizer"
                )
        else:
            # The preset's vocabulary is a placeholder: the tokenizer decides the embedding size.
            mcfg = self.cfg.model.replace(vocab_size=self.data.vocab_size)
        if self.cfg.trainer.seq_len > mcfg.max_seq_len:
            raise ValueError(f"trainer.seq_len={self.cfg.trainer.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
        return mcfg

    # ---------------------------------------------------------------- checkpoints

    def _maybe_resume(self) -> bool:
        found = self.ckpts.complete()
        resume = self.cfg.resume
        if resume != "auto" and found and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            # a requeued Slurm job (preempted, or past its time limit with max_num_timeout) runs its original command
            print(f"Slurm requeued this job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): resuming")
            resume = "auto"
        if resume != "auto":
            if found:  # a fresh run here would mix its checkpoints and curves with the old run's
                raise ValueError(
                    f"{self.run_dir} already holds checkpoints of another run ({found[-1][1].name}); continue it with "
                    f"resume=auto, or choose a new directory with hydra.run.dir=..."
                )
            return False
        # rank 0 verifies (and sets damaged ones aside); every rank loads the checkpoint it chose
        chosen = self.par.broadcast(self.ckpts.newest_intact() if self.par.is_main else None)
        if chosen is None:
            print(f"resume=auto: no checkpoint in {self.ckpts.root}, starting from step 0")
            return False
        step, path = chosen
        if step != found[-1][0]:
            print(f"resume=auto: continuing from {path.name}, the newest intact checkpoint")
        saved = read_metadata(path)
        if not same_model(ModelConfig.from_dict(saved["model"]), self.model_cfg):  # new fields take their defaults
            raise ValueError(
                f"resume=auto: {path} was trained with a different model config; resume with the same overrides, "
                f"or start a new run directory (hydra.run.dir=...)"
            )
        if saved.get("data_fingerprint") != self.data.fingerprint:
            raise ValueError(f"resume=auto: {path} was trained on different data or a different tokenizer")
        optimizer, self.state, rng = load_trainer_state(path, self.device)
        load_weights(self.model, path)
        self.par.load_optimizer_state(self.optimizer, self.model, optimizer)  # full-size layout
        set_rng_state(rng)
        self._step_rng = rng
        print(f"resumed from {path} at step {step}")
        return True

    def save(self) -> Path:
        path = self.ckpts.path(self.state.step)
        # Full-size weights and optimizer state (expert shards gathered: every rank takes part; rank 0 writes).
        weights, optimizer = self.par.model_state(self.model), self.par.optimizer_state(self.optimizer, self.model)
        bad = _first_non_finite(weights if weights is not None else self.model.state_dict(), optimizer)
        if self.par.agree(bad is not None):  # every rank refuses together (expert shards differ between ranks)
            raise FloatingPointError(
                f"not saving {path}: {bad or 'another rank holds a non-finite tensor'} at step {self.state.step}; "
                f"{self._last_good()}"
            )
        self.par.save_engine(self.run_dir, self.state.step)  # deepspeed.engine_checkpoint: DeepSpeed's own as well
        if not self.par.is_main:
            self.par.barrier()  # returns once rank 0 has written the checkpoint
            return path
        extra = state_writers(optimizer, self.state, self._step_rng)
        if self.data.tokenizer is not None:
            extra["tokenizer.json"] = self.data.tokenizer.save
        meta = {"step": self.state.step, "data_fingerprint": self.data.fingerprint, "run": self.cfg.to_dict()}
        try:
            save_checkpoint(path, self.model, extra=extra, metadata=meta, state=weights)
        except (OSError, RuntimeError) as e:  # disk full, quota, permissions: say where, and what is still safe
            previous = self.ckpts.complete()
            raise OSError(
                f"could not write checkpoint {path} ({type(e).__name__}: {e}); nothing was left half-written"
                + (f" and the previous checkpoint {previous[-1][1]} is intact" if previous else "")
                + "; free space or choose another hydra.run.dir, then resume=auto"
            ) from e
        self.ckpts.rotate()
        self.par.barrier()
        return path

    def _last_good(self) -> str:
        found = self.ckpts.complete()
        return (f"the last good checkpoint is {found[-1][1]}: continue from it with resume=auto and a lower optim.lr"
                if found else
                "no checkpoint of this run was kept; start again with a lower optim.lr")

    # ---------------------------------------------------------------- steps

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in self.val_set:
            with self.autocast():
                losses.append(self.model(x.to(self.device), y.to(self.device)).loss.item())
        self.model.train()
        return self.par.mean(float(np.mean(losses)))  # equal row shards: the mean over ranks is the global mean

    def train_step(self) -> dict[str, Any]:
        tc, step = self.cfg.trainer, self.state.step
        lr = lr_at(step, self.cfg.optim, tc.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lm_loss = 0.0
        aux: dict[str, float] = {}
        stats: dict[int, dict[str, torch.Tensor]] = {}
        for micro in range(tc.grad_accum):
            # the global batch, whatever the world size; each rank keeps its rows (trainer=ddp)
            x, y = self.par.local_rows(*self.data.get_batch("train", step * tc.grad_accum + micro, tc.batch_size,
                                                            tc.seq_len, self.cfg.seed))
            with self.autocast():
                out = self.par.forward(self.model, x.to(self.device), y.to(self.device))
            self.par.backward(out.total_loss / tc.grad_accum)
            lm_loss += out.loss.item() / tc.grad_accum
            for name, value in out.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value.item() / tc.grad_accum
            for layer, values in out.stats.items():  # sum counts over micro-batches, average the rest
                acc = stats.setdefault(layer, {k: torch.zeros_like(v) for k, v in values.items()})
                for k, v in values.items():
                    acc[k] += v if k == "tokens_per_expert" else v / tc.grad_accum
        # trainer=ddp|deepspeed: gradients reduced over the ranks, the global norm computed over the expert shards.
        # A non-finite norm (the same on every rank) updates nothing: the engine skips the optimizer step.
        grad_norm = float(self.par.step(self.model, self.optimizer, tc.grad_clip))  # clip, update, clear
        skipped = not math.isfinite(grad_norm)
        if skipped and not self.par.skips_non_finite:
            raise FloatingPointError(
                f"the gradient norm is {grad_norm} at step {step + 1} and trainer={tc.kind} has already applied the "
                f"update (it cannot skip a step); {self._last_good()}"
            )
        lm_loss, aux, stats = self.par.reduce_step(lm_loss, aux, stats)  # logged values: the global batch's
        if not skipped:
            for module in self.model.modules():  # routers with per-step state (bias balancing) update it now
                if isinstance(module, Router):
                    module.after_optimizer_step()
        return {"lr": lr, "lm_loss": lm_loss, "aux": aux, "stats": stats, "grad_norm": grad_norm, "skipped": skipped}

    def _count_skip(self, skipped: bool) -> None:
        st = self.state
        st.skipped_in_a_row = st.skipped_in_a_row + 1 if skipped else 0
        st.skipped_steps += skipped
        if skipped:
            warnings.warn(f"step {st.step}: the gradient norm is not finite; the update was skipped ({st.skipped_in_a_row} "
                          f"in a row, trainer.max_skipped_steps={self.cfg.trainer.max_skipped_steps})", stacklevel=2)

    def _stop_if_diverged(self) -> None:
        """Too many skipped steps in a row stop the run. Since the weights do not change during the run of skips,
        the checkpoint of the step before it holds weights whose gradients were not finite on every batch since: it
        is set aside (step_N.diverged) so that resume=auto takes the one before."""
        st, limit = self.state, self.cfg.trainer.max_skipped_steps
        if st.skipped_in_a_row <= limit:
            return
        since = st.step - st.skipped_in_a_row  # the weights as they left this step
        if self.par.is_main:
            for step, _ in self.ckpts.complete():
                if step >= since:
                    print(f"set aside {self.ckpts.set_aside(step, 'diverged')}: its weights give non-finite gradients")
        self.par.barrier()
        raise FloatingPointError(
            f"the gradient norm was not finite for {st.skipped_in_a_row} steps in a row (steps {since + 1}-{st.step}; "
            f"trainer.max_skipped_steps={limit}): the weights since step {since} diverge; {self._last_good()}"
        )

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        tc, st = self.cfg.trainer, self.state
        self._write_run_file("running")
        if self.par.is_main:
            print(describe(self.data))
            print(f"model: {self.params.total:,} parameters, {self.params.active:,} active per token, "
                  f"{self.flops_per_token:.3g} training FLOPs per token; sparse layers {list(self.model_cfg.sparse_layers)}")
            print(describe_dispatch(self.model))
        tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
        last_log = (time.perf_counter(), st.tokens, st.elapsed_s)
        val_loss: Optional[float] = None
        last_stats: dict[int, dict[str, torch.Tensor]] = {}
        bar = _progress(tc.progress and self.par.is_main, tc.max_steps, st.step)
        self.model.train()
        try:
            with self.preemption:
                while st.step < tc.max_steps:
                    self._step_rng = rng_state()
                    t0 = time.perf_counter()
                    out = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    st.elapsed_s += time.perf_counter() - t0
                    st.step += 1
                    self._step_rng = rng_state()  # an interrupt from here on saves this step: the RNG as it leaves it
                    st.tokens += tokens_per_step
                    st.flops += self.flops_per_token * tokens_per_step
                    if not out["skipped"]:  # a skipped step's loss is NaN or inf: it would poison the mean
                        st.loss_sum += out["lm_loss"]
                        st.loss_count += 1
                    self._count_skip(out["skipped"])
                    last_stats = out["stats"]
                    for layer, values in out["stats"].items():  # every step: patience counts steps
                        for message in self.collapse.update(st.step, layer, values["tokens_per_expert"], tokens_per_step):
                            warnings.warn(message, stacklevel=1)
                    final = st.step == tc.max_steps
                    evaluate = final or (tc.eval_interval > 0 and st.step % tc.eval_interval == 0)
                    val_loss = self.evaluate() if evaluate else None
                    if final or evaluate or st.step % tc.log_interval == 0:
                        tps = (st.tokens - last_log[1]) / max(st.elapsed_s - last_log[2], 1e-9)
                        record = {"step": st.step, "tokens": st.tokens, "flops": st.flops,
                                  "train_loss": st.loss_sum / st.loss_count if st.loss_count else math.nan,
                                  "lr": out["lr"], "grad_norm": out["grad_norm"], "skipped_steps": st.skipped_steps,
                                  "tokens_per_s": tps, "elapsed_s": st.elapsed_s, **out["aux"]}
                        if val_loss is not None:
                            record["val_loss"] = val_loss
                        record.update(flatten_stats(out["stats"]))
                        self.logger.log(record)
                        st.loss_sum, st.loss_count = 0.0, 0
                        last_log = (time.perf_counter(), st.tokens, st.elapsed_s)
                        if bar is not None:
                            bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{tps:,.0f}")
                    if bar is not None:
                        bar.update(1)
                    self._stop_if_diverged()  # after the record: the metrics show the last skipped step
                    saved = False
                    # no periodic checkpoint inside a run of skipped steps: it would hold the weights from before the
                    # run and rotate older, good checkpoints away
                    if final or (tc.ckpt_interval > 0 and st.step % tc.ckpt_interval == 0 and not st.skipped_in_a_row):
                        self.save()
                        saved = True
                    # one scalar all-reduce per step under torchrun: every rank stops after the same step
                    if self.par.agree(self.preemption.received is not None):
                        path = self.ckpts.path(st.step) if saved else self.save()
                        signum = self.preemption.received  # None: another rank was signalled
                        self._write_run_file("preempted", {"step": st.step, "checkpoint": str(path),
                                                           "signal": signal.Signals(signum).name if signum else None})
                        raise Preempted(signum, st.step, str(path))
        except KeyboardInterrupt:
            # The last complete step is saved so that resume=auto continues exactly from it.
            if st.step > 0 and not self.ckpts.path(st.step).exists():
                path = self.save()
                print(f"\ninterrupted: saved {path}; continue with resume=auto")
            self._write_run_file("interrupted")
            raise
        except Preempted:
            raise
        except BaseException as e:
            # every rank writes: when rank 0 is the one that died, the survivors still say why the run ended
            self._write_run_file("failed", {"error": f"{type(e).__name__}: {e}", "rank": self.par.rank}, every_rank=True)
            raise
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        if val_loss is None:  # resumed at max_steps: no step ran, so nothing was evaluated
            val_loss = self.evaluate()
        if last_stats and self.par.is_main:
            print(f"routing at step {st.step} (last training batch):\n{routing_summary(last_stats)}")
        summary = {"final_val_loss": val_loss, "unigram_entropy": self.data.unigram_entropy("val"),
                   "steps": st.step, "tokens": st.tokens, "flops": st.flops, "elapsed_s": st.elapsed_s,
                   "skipped_steps": st.skipped_steps,
                   "metrics": str(self.logger.path), "checkpoint": str(self.ckpts.complete()[-1][1])}
        self._write_run_file("finished", summary)
        return summary

    def _write_run_file(self, status: str, summary: Optional[dict] = None, every_rank: bool = False) -> None:
        """run.json: what a report needs besides the curves (sizes, FLOPs per token, data identity, status).
        Rank 0 writes it, or with every_rank each surviving rank (a failure: rank 0 may be the one that died)."""
        if not (self.par.is_main or every_rank):
            return
        info = {"status": status, "params_total": self.params.total, "params_active": self.params.active,
                "flops_per_token": self.flops_per_token, "data_fingerprint": self.data.fingerprint,
                "vocab_size": self.model_cfg.vocab_size, "sparse_layers": list(self.model_cfg.sparse_layers),
                "twin": self.cfg.twin, "group": self.cfg.logger.group,
                "config": {**self.cfg.to_dict(), "model": self.model_cfg.to_dict()}, "summary": summary}
        tmp = self.run_dir / f"{RUN_FILE}.tmp-{self.par.rank}"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.run_dir / RUN_FILE)


def _first_non_finite(weights: dict[str, torch.Tensor], optimizer: dict) -> Optional[str]:
    """The name of the first weight or optimizer-state tensor holding NaN or inf, or None when all are finite."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name} is not finite"
    for index, values in optimizer["state"].items():
        for k, t in values.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {k} of parameter {index} is not finite"
    return None


def _checkpoint_tokenizer(init_from: Optional[str]):
    """The tokenizer stored in an init_from checkpoint (an upcycled released model brings its own): the corpus is
    tokenized with it, so token ids mean what the weights learned. None when there is none."""
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return load_tokenizer(Path(init_from) / "tokenizer.json")
    return None


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
