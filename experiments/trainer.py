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

What a step reads on the host: nothing but the engine's gradient norm (the skip decision). Losses, aux losses and
routing statistics stay device tensors until a record (every trainer.log_interval steps, an evaluation, the end),
which reads them once, reduces them over the ranks and writes metrics.jsonl and a line (experiments.run_log) to the
console and RUN_DIR/train.log.
"""
from __future__ import annotations

import dataclasses
import json
import math
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
from experiments.engines import build_engine
from experiments.engines.deepspeed_ops import announce_build
from experiments.engines.full_size import use_bf16
from experiments.engines.ranks import quiet_dependencies, rank_0_prints
from experiments.metrics import METRICS_FILE, MetricsLogger, NullLogger, flatten_stats, routing_summary
from experiments.optim import describe_optimizer, lr_at
from experiments.peak_flops import peak_flops
from experiments.preemption import Preempted, PreemptionFlag
from experiments.provenance import run_provenance
from experiments.run_log import RunLog, record_line
from experiments.tokenizer import load_tokenizer
from experiments.trainer_state import TrainState, rng_state, set_rng_state
from moe.atomic import write_text
from moe.checkpoint import load_config, load_weights
from moe.dispatch import describe_dispatch
from moe.flops import count_params, flops_per_token
from moe.model import Transformer
from routing.router import Router
from routing.stats import CollapseMonitor

RUN_FILE = "run.json"


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in run_dir/checkpoints, oldest first (experiments.checkpoints)."""
    return CheckpointManager(run_dir, keep=1).complete()


class Trainer:
    """The loop: steps, evaluates and logs. The engine (experiments.engines) spreads the model over the ranks and
    runs each step's communication; the checkpoint manager (experiments.checkpoints) saves and resumes."""

    def __init__(self, cfg: RunConfig, data: Optional[PreparedData] = None):
        self.cfg = cfg
        tc = cfg.trainer
        quiet_dependencies()  # before the engine imports DeepSpeed: ranks other than 0 keep their warnings to themselves
        building, t0 = announce_build(tc.kind, tc.device), time.perf_counter()  # DeepSpeed's silent first-use compile
        with rank_0_prints():
            self.engine = build_engine(cfg)  # checks the settings, then (torchrun) joins the process group
        if building:
            print(f"DeepSpeed set up in {time.perf_counter() - t0:.1f} s", flush=True)
        self.ranks = ranks = self.engine.ranks
        self.run_dir = Path(ranks.broadcast(str(cfg.path), "broadcast of rank 0's run directory"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.run_dir, ranks.is_main)  # rank 0's lines: console and RUN_DIR/train.log
        self.ckpts = CheckpointManager(self.run_dir, tc.keep_checkpoints)
        if ranks.is_main:
            for name in self.ckpts.remove_leftovers():
                self.log.info(f"removed {name}: left in {self.ckpts.root} by an interrupted write")
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = self.engine.device
        self.data = data or ranks.main_first(lambda: prepare(cfg.data, tokenizer=_checkpoint_tokenizer(cfg.init_from)))
        self.model_cfg = self._model_config()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = Transformer(self.model_cfg)  # full size on every rank: the single process's initialisation
        if cfg.init_from:
            load_weights(self.model, cfg.init_from)
        if tc.activation_checkpointing:
            self.model.set_activation_checkpointing(tc.activation_checkpointing)
        self.optimizer = self.engine.wrap(self.model, cfg.optim)  # expert shards, wrappers, the optimizer on them
        self.sharded = tc.checkpoint_format == "sharded" or (tc.checkpoint_format == "auto" and tc.kind == "fsdp")
        self.state = TrainState()
        self.params = count_params(self.model_cfg)
        self.flops_per_token = flops_per_token(self.model_cfg, tc.seq_len).training
        self.peak_flops = peak_flops(self.device, use_bf16(tc.precision, self.device))  # None: no MFU (CPU, unknown GPU)
        self.val_set = [ranks.local_rows(*b) for b in self.data.val_batches(tc.batch_size, tc.seq_len, tc.eval_batches)]
        self.collapse = CollapseMonitor()
        self.preemption = PreemptionFlag()
        resumed = self.ckpts.resume(cfg.resume, self.engine, self.optimizer, self.model, self.data.fingerprint)
        if resumed is not None:
            self.state, rng = resumed
            set_rng_state(rng)
        # The training-loss sum since the last record, on the device: a step adds to it without reading it
        # (float64, the arithmetic of the Python floats it replaces); records and checkpoints read it.
        self._loss_sum = torch.tensor(self.state.loss_sum, dtype=torch.float64, device=self.device)
        self._step_rng = rng_state()  # the RNG at the current step boundary: what a checkpoint of it holds
        self.logger = (MetricsLogger(self.run_dir, cfg.logger, cfg.to_dict(), resume_step=self.state.step if resumed else None)
                       if ranks.is_main else NullLogger(self.run_dir / METRICS_FILE))

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

    def save(self) -> Path:
        """Checkpoints the current step (every rank calls it)."""
        self._fold_loss_sum()
        extra = {"tokenizer.json": self.data.tokenizer.save} if self.data.tokenizer is not None else {}
        meta = {"step": self.state.step, "data_fingerprint": self.data.fingerprint, "run": self.cfg.to_dict()}
        return self.ckpts.save(self.state.step, self.engine, self.optimizer, self.model_cfg, self.state,
                               self._step_rng, self.sharded, meta, extra)

    # ---------------------------------------------------------------- steps

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        # the batches' losses read in one transfer, averaged on the host as before (np.mean of the same floats)
        losses = torch.stack([self.engine.forward(x, y).loss.detach().float() for x, y in self.val_set]).tolist()
        self.model.train()
        return self.ranks.mean(float(np.mean(losses)))  # equal row shards: the mean over ranks is the global mean

    def train_step(self) -> dict[str, Any]:
        """One optimizer step with its logged values read back: the losses and routing statistics of the global
        batch as Python floats and reduced tensors (benchmarks and tests step with this; the loop does not)."""
        out = self.device_step()
        lm_loss, aux, stats = self.ranks.reduce_logged(float(out["lm_loss"]), _floats(out["aux"]), out["stats"])
        return {**out, "lm_loss": lm_loss, "aux": aux, "stats": stats}

    def device_step(self) -> dict[str, Any]:
        """One optimizer step whose logged values stay this rank's device tensors: lm_loss and aux (float64
        scalars, the mean over micro-batches), stats (counts summed, the rest averaged). Nothing here reads a
        tensor on the host except the engine's gradient norm: whether to skip the update must be known before
        the optimizer runs, and AdamW cannot be made to update nothing by a device-side guard (its moments and
        weight decay move even for a zero gradient), so every engine reads the norm once per step."""
        tc, step = self.cfg.trainer, self.state.step
        lr = lr_at(step, self.cfg.optim, tc.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = tc.grad_accum
        lm_loss: Optional[torch.Tensor] = None
        aux: dict[str, torch.Tensor] = {}
        stats: dict[int, dict[str, torch.Tensor]] = {}
        for micro in range(n):
            # the global batch, whatever the world size; each rank keeps its rows
            x, y = self.ranks.local_rows(*self.data.get_batch("train", step * n + micro, tc.batch_size,
                                                              tc.seq_len, self.cfg.seed))
            out = self.engine.train_micro(x, y, 1.0 / n, last=micro == n - 1)
            lm_loss = _mean_term(lm_loss, out.loss.detach().double(), n)
            for name, value in out.aux_losses.items():
                aux[name] = _mean_term(aux.get(name), value.detach().double(), n)
            for layer, values in out.stats.items():  # sum counts over micro-batches, average the rest
                acc = stats.setdefault(layer, {})
                for k, v in values.items():
                    acc[k] = _mean_term(acc.get(k), v, 1 if k == "tokens_per_expert" else n)
        # Gradients reduced over the ranks, the global norm computed over the shards; a non-finite norm (the same
        # on every rank) updates nothing where the engine can skip the optimizer step.
        grad_norm = float(self.engine.step(self.optimizer, tc.grad_clip))  # clip, update, clear
        skipped = not math.isfinite(grad_norm)
        if skipped and not self.engine.skips_non_finite:
            raise FloatingPointError(
                f"the gradient norm is {grad_norm} at step {step + 1} and trainer={tc.kind} has already applied the "
                f"update (it cannot skip a step); {self.ckpts.last_good()}"
            )
        if not skipped:
            for module in self.model.modules():  # routers with per-step state (bias balancing) update it now
                if isinstance(module, Router):
                    module.after_optimizer_step()
        return {"lr": lr, "lm_loss": lm_loss, "aux": aux, "stats": stats, "grad_norm": grad_norm, "skipped": skipped}

    def _fold_loss_sum(self) -> None:
        """The device's loss sum into TrainState (what a checkpoint holds), as the mean over the ranks (every rank
        calls it): the sum carried over a resume is then the global batch's, and the record's mean stays exact."""
        self.state.loss_sum = self.ranks.mean(float(self._loss_sum))
        self._loss_sum.fill_(self.state.loss_sum)

    def _count_skip(self, skipped: bool) -> None:
        st = self.state
        st.skipped_in_a_row = st.skipped_in_a_row + 1 if skipped else 0
        st.skipped_steps += skipped
        if skipped:
            self._warn(f"step {st.step}: the gradient norm is not finite; the update was skipped ({st.skipped_in_a_row} "
                       f"in a row, trainer.max_skipped_steps={self.cfg.trainer.max_skipped_steps})")

    def _warn(self, message: str) -> None:
        """A Python warning (the console's stderr, pytest.warns), and the same line in train.log."""
        warnings.warn(message, stacklevel=3)
        self.log.file_only(f"warning: {message}")

    def _stop_if_diverged(self) -> None:
        """Too many skipped steps in a row stop the run. Since the weights do not change during the run of skips,
        the checkpoint of the step before it holds weights whose gradients were not finite on every batch since: it
        is set aside (step_N.diverged) so that resume=auto takes the one before."""
        st, limit = self.state, self.cfg.trainer.max_skipped_steps
        if st.skipped_in_a_row <= limit:
            return
        since = st.step - st.skipped_in_a_row  # the weights as they left this step
        if self.ranks.is_main:
            for step, _ in self.ckpts.complete():
                if step >= since:
                    self.log.info(f"set aside {self.ckpts.set_aside(step, 'diverged')}: its weights give non-finite "
                                  f"gradients")
        self.ranks.barrier()
        raise FloatingPointError(
            f"the gradient norm was not finite for {st.skipped_in_a_row} steps in a row (steps {since + 1}-{st.step}; "
            f"trainer.max_skipped_steps={limit}): the weights since step {since} diverge; {self.ckpts.last_good()}"
        )

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        finally:
            self.log.close()  # train.log's handle; a later line (another fit) opens it again

    def _fit(self) -> dict[str, Any]:
        tc, st = self.cfg.trainer, self.state
        self._write_run_file("running")
        self.log.info(describe(self.data))
        self.log.info(f"model: {self.params.total:,} parameters, {self.params.active:,} active per token, "
                      f"{self.flops_per_token:.3g} training FLOPs per token; sparse layers {list(self.model_cfg.sparse_layers)}")
        self.log.info(describe_dispatch(self.model))
        self.log.info(describe_optimizer(self.optimizer, self.cfg.optim, tc.kind))  # fused or foreach, and why
        self._last_log = (st.tokens, st.elapsed_s)  # what the next record's tokens/s are measured from
        self._started = (time.perf_counter(), st.step)  # what the lines' elapsed and ETA are measured from
        val_loss: Optional[float] = None
        self._logged_stats: dict[int, dict[str, torch.Tensor]] = {}  # the last record's (reduced) routing statistics
        self.log.start_bar(tc.progress, tc.max_steps, st.step)
        if st.step == 0 and tc.eval_at_start:  # the curve's first point: the initial model (not on a resume)
            record = {"step": 0, "tokens": 0, "flops": 0.0, "elapsed_s": 0.0, "val_loss": self.evaluate()}
            self.logger.log(record)
            self.log.info(record_line(record, tc.max_steps, 0.0, None))
        self.model.train()
        try:
            with self.preemption:
                while st.step < tc.max_steps:
                    out = self._timed_step(self._reads_after(st.step + 1))
                    final = st.step == tc.max_steps
                    evaluate = final or (tc.eval_interval > 0 and st.step % tc.eval_interval == 0)
                    val_loss = self.evaluate() if evaluate else None
                    if final or evaluate or st.step % tc.log_interval == 0:
                        self._log(out, val_loss)
                    self.log.advance()
                    self._stop_if_diverged()  # after the record: the metrics show the last skipped step
                    self._checkpoint_or_stop(final)
        except KeyboardInterrupt:
            # The last complete step is saved so that resume=auto continues exactly from it.
            if st.step > 0 and not self.ckpts.path(st.step).exists():
                path = self.save()
                self.log.close_bar()
                self.log.info(f"interrupted: saved {path}; continue with resume=auto")
            self._write_run_file("interrupted")
            raise
        except Preempted:
            raise
        except BaseException as e:
            # every rank writes: when rank 0 is the one that died, the survivors still say why the run ended
            self._write_run_file("failed", {"error": f"{type(e).__name__}: {e}", "rank": self.ranks.rank}, every_rank=True)
            self.log.file_only(f"failed: {type(e).__name__}: {e}")
            raise
        finally:
            self.log.close_bar()
            self.logger.close()
        if val_loss is None:  # resumed at max_steps: no step ran, so nothing was evaluated
            val_loss = self.evaluate()
        if self._logged_stats:  # the final step is always recorded: these are its statistics
            self.log.info(f"routing at step {st.step} (last training batch):\n{routing_summary(self._logged_stats)}")
        summary = {"final_val_loss": val_loss, "unigram_entropy": self.data.unigram_entropy("val"),
                   "steps": st.step, "tokens": st.tokens, "flops": st.flops, "elapsed_s": st.elapsed_s,
                   "skipped_steps": st.skipped_steps,
                   "metrics": str(self.logger.path), "checkpoint": str(self.ckpts.complete()[-1][1])}
        self._write_run_file("finished", summary)
        # train.log only: experiments.train prints these lines on the console
        self.log.file_only(f"final validation loss {val_loss:.4f} nats (unigram entropy of the validation split: "
                           f"{summary['unigram_entropy']:.4f})\nmetrics:    {summary['metrics']}\n"
                           f"checkpoint: {summary['checkpoint']}")
        return summary

    def _reads_after(self, step: int) -> bool:
        """Whether the loop reads the device after `step` (a record, an evaluation, a checkpoint, the end): its
        step is timed to the device's finish. Other steps queue work and are not waited for."""
        tc = self.cfg.trainer
        return (step >= tc.max_steps or step % tc.log_interval == 0
                or (tc.eval_interval > 0 and step % tc.eval_interval == 0)
                or (tc.ckpt_interval > 0 and step % tc.ckpt_interval == 0))

    def _timed_step(self, reads_after: bool = True) -> dict[str, Any]:
        """One optimizer step, and the counters it moves (time, tokens, FLOPs, the loss sum, skips, collapse),
        with no host read (device_step's gradient norm aside). Only a step that is read after (reads_after)
        waits for the device (CUDA): the time of the steps before it, queued asynchronously, lands in its interval,
        so the seconds summed over a record's steps are the device's."""
        tc, st = self.cfg.trainer, self.state
        t0 = time.perf_counter()
        out = self.device_step()
        if reads_after and self.device.type == "cuda":
            torch.cuda.synchronize()
        st.elapsed_s += time.perf_counter() - t0
        st.step += 1
        self._step_rng = rng_state()  # an interrupt from here on saves this step: the RNG as it leaves it
        tokens = tc.batch_size * tc.seq_len * tc.grad_accum
        st.tokens += tokens
        st.flops += self.flops_per_token * tokens
        if not out["skipped"]:  # a skipped step's loss is NaN or inf: it would poison the mean
            self._loss_sum += out["lm_loss"]
            st.loss_count += 1
        self._count_skip(out["skipped"])
        for layer, values in out["stats"].items():  # every step (patience counts steps), read at the next record
            self.collapse.observe(st.step, layer, values["tokens_per_expert"], tokens // self.ranks.world_size)
        return out

    def _log(self, out: dict[str, Any], val_loss: Optional[float]) -> None:
        """One metrics record: the mean training loss since the last one, throughput, the step's routing; the
        device's values are read here, once per record, and reduced over the ranks (every rank calls it)."""
        tc, st = self.cfg.trainer, self.state
        loss_sum, aux, stats = self.ranks.reduce_logged(float(self._loss_sum), _floats(out["aux"]), out["stats"])
        tps = (st.tokens - self._last_log[0]) / max(st.elapsed_s - self._last_log[1], 1e-9)
        record = {"step": st.step, "tokens": st.tokens, "flops": st.flops,
                  "train_loss": loss_sum / st.loss_count if st.loss_count else math.nan,
                  "lr": out["lr"], "grad_norm": out["grad_norm"], "skipped_steps": st.skipped_steps,
                  "tokens_per_s": tps, "flops_per_s": self.flops_per_token * tps,  # achieved model FLOP/s
                  "elapsed_s": st.elapsed_s, **aux}
        if self.peak_flops:
            record["mfu"] = record["flops_per_s"] / self.peak_flops
        if val_loss is not None:
            record["val_loss"] = val_loss
        record.update(flatten_stats(stats))
        self._logged_stats = stats
        self.logger.log(record)
        self._loss_sum.zero_()
        st.loss_sum, st.loss_count = 0.0, 0
        self._last_log = (st.tokens, st.elapsed_s)
        wall = time.perf_counter() - self._started[0]
        done = st.step - self._started[1]
        self.log.info(record_line(record, tc.max_steps, wall, wall / done * (tc.max_steps - st.step) if done else None))
        for message in self.collapse.report():  # this rank's counts (world size 1: the global batch's)
            if self.ranks.is_main:
                self._warn(message)

    def _checkpoint_or_stop(self, final: bool) -> None:
        """The periodic or final checkpoint, then the ranks' agreement on a preemption signal (one scalar
        all-reduce per step under torchrun: every rank stops after the same step, its checkpoint written)."""
        tc, st = self.cfg.trainer, self.state
        saved = None
        # no periodic checkpoint inside a run of skipped steps: it would hold the weights from before the run and
        # rotate older, good checkpoints away
        if final or (tc.ckpt_interval > 0 and st.step % tc.ckpt_interval == 0 and not st.skipped_in_a_row):
            saved = self.save()
        if self.ranks.agree(self.preemption.received is not None):
            path = saved or self.save()
            signum = self.preemption.received  # None: another rank was signalled
            self._write_run_file("preempted", {"step": st.step, "checkpoint": str(path),
                                               "signal": signal.Signals(signum).name if signum else None})
            raise Preempted(signum, st.step, str(path))

    def _write_run_file(self, status: str, summary: Optional[dict] = None, every_rank: bool = False) -> None:
        """run.json: what a report needs besides the curves (sizes, FLOPs per token, data identity, status).
        Rank 0 writes it, or with every_rank each surviving rank (a failure: rank 0 may be the one that died)."""
        if not (self.ranks.is_main or every_rank):
            return
        info = {"status": status, "params_total": self.params.total, "params_active": self.params.active,
                "flops_per_token": self.flops_per_token, "data_fingerprint": self.data.fingerprint,
                "vocab_size": self.model_cfg.vocab_size, "sparse_layers": list(self.model_cfg.sparse_layers),
                "twin": self.cfg.twin, "group": self.cfg.logger.group,
                "config": {**self.cfg.to_dict(), "model": self.model_cfg.to_dict()}, "summary": summary,
                "provenance": run_provenance(self.run_dir, status)}  # launcher, host, load, commit, versions
        write_text(self.run_dir / RUN_FILE, json.dumps(info, indent=2))  # a temporary name per process, renamed


def _checkpoint_tokenizer(init_from: Optional[str]):
    """The tokenizer stored in an init_from checkpoint (an upcycled released model brings its own): the corpus is
    tokenized with it, so token ids mean what the weights learned. None when there is none."""
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return load_tokenizer(Path(init_from) / "tokenizer.json")
    return None


def _floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors read on the host (a record's aux losses)."""
    return {name: float(value) for name, value in values.items()}


def _mean_term(total: Optional[torch.Tensor], value: torch.Tensor, n: int) -> torch.Tensor:
    """total + value / n, the running mean over n micro-batches (a sum for n=1 terms); the first term (total None)
    and n=1 skip an addition of zero and a division by one: exact either way, two tensor ops fewer per value."""
    term = value / n if n > 1 else value
    return term if total is None else total + term
