"""The single-process training loop: batches, AdamW, schedule, clipping, accumulation, evaluation,
metrics, atomic checkpoints and exact resumption.

Exact resumption rests on three things: batches are a pure function of (seed, step) (experiments.data),
the checkpoint holds the optimizer state and the RNG state at the step boundary, and the metrics file is cut
back to the checkpoint's step. On CPU a resumed run reproduces the uninterrupted run's losses bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from experiments.config import RunConfig
from experiments.data import PreparedData, describe, prepare
from experiments.distributed import NullLogger, setup_parallel
from experiments.metrics import METRICS_FILE, MetricsLogger, flatten_stats, routing_summary
from experiments.optim import build_optimizer, lr_at
from experiments.tokenizer import load_tokenizer
from moe.checkpoint import load_config, load_weights, read_metadata, save_checkpoint
from moe.dispatch import describe_dispatch
from moe.flops import count_params, flops_per_token
from moe.config import ModelConfig
from moe.model import Transformer
from moe.parallel import same_model
from routing.router import Router
from routing.stats import CollapseMonitor

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed
    flops: float = 0.0  # cumulative training FLOPs (model FLOPs: 3x forward, see moe.flops)
    elapsed_s: float = 0.0  # seconds spent in training steps (evaluation and checkpointing excluded)
    loss_sum: float = 0.0  # LM loss summed since the last metrics record (carried across a resume)
    loss_count: int = 0  # steps in loss_sum


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available; use trainer.device=cpu")
    return device


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in run_dir/checkpoints, oldest first (temporary names start with a dot)."""
    root = run_dir / "checkpoints"
    found = []
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.name.split("_", 1)[1].isdigit() and (p / STATE_FILE).is_file():
            found.append((int(p.name.split("_", 1)[1]), p))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg: RunConfig, data: Optional[PreparedData] = None):
        self.cfg = cfg
        tc = cfg.trainer
        self.par = setup_parallel(cfg)  # trainer=ddp: checks the settings, then joins torchrun's process group
        self.run_dir = Path(self.par.broadcast(str(cfg.path)))  # rank 0's directory for every rank
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        self._step_rng = _rng_state()
        self.collapse = CollapseMonitor()
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
        found = checkpoint_dirs(self.run_dir)
        if self.cfg.resume != "auto":
            if found:  # a fresh run here would mix its checkpoints and curves with the old run's
                raise ValueError(
                    f"{self.run_dir} already holds checkpoints of another run ({found[-1][1].name}); continue it with "
                    f"resume=auto, or choose a new directory with hydra.run.dir=..."
                )
            return False
        if not found:
            print(f"resume=auto: no checkpoint in {self.run_dir / 'checkpoints'}, starting from step 0")
            return False
        step, path = found[-1]
        saved = read_metadata(path)
        if not same_model(ModelConfig.from_dict(saved["model"]), self.model_cfg):  # new fields take their defaults
            raise ValueError(
                f"resume=auto: {path} was trained with a different model config; resume with the same overrides, "
                f"or start a new run directory (hydra.run.dir=...)"
            )
        if saved.get("data_fingerprint") != self.data.fingerprint:
            raise ValueError(f"resume=auto: {path} was trained on different data or a different tokenizer")
        load_weights(self.model, path)
        blob = torch.load(path / STATE_FILE, map_location=self.device, weights_only=False)
        self.par.load_optimizer_state(self.optimizer, self.model, blob["optimizer"])  # full-size layout
        self.state = TrainState(**blob["state"])
        _set_rng_state(blob["rng"])
        self._step_rng = blob["rng"]
        print(f"resumed from {path} at step {step}")
        return True

    def save(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{self.state.step}"
        # Full-size weights and optimizer state (expert shards gathered: every rank takes part; rank 0 writes).
        weights, optimizer = self.par.model_state(self.model), self.par.optimizer_state(self.optimizer, self.model)
        self.par.save_engine(self.run_dir, self.state.step)  # deepspeed.engine_checkpoint: DeepSpeed's own as well
        if not self.par.is_main:
            self.par.barrier()  # returns once rank 0 has written the checkpoint
            return path
        blob = {"optimizer": optimizer, "state": asdict(self.state), "rng": self._step_rng}
        extra = {STATE_FILE: lambda p: torch.save(blob, p)}
        if self.data.tokenizer is not None:
            extra["tokenizer.json"] = self.data.tokenizer.save
        meta = {"step": self.state.step, "data_fingerprint": self.data.fingerprint, "run": self.cfg.to_dict()}
        save_checkpoint(path, self.model, extra=extra, metadata=meta, state=weights)
        for _, old in checkpoint_dirs(self.run_dir)[: -self.cfg.trainer.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.par.barrier()
        return path

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
        # trainer=ddp|deepspeed: gradients reduced over the ranks, the global norm computed over the expert shards
        grad_norm = self.par.step(self.model, self.optimizer, tc.grad_clip)  # clip, update, clear
        lm_loss, aux, stats = self.par.reduce_step(lm_loss, aux, stats)  # logged values: the global batch's
        for module in self.model.modules():  # routers with per-step state (bias balancing) update it now
            if isinstance(module, Router):
                module.after_optimizer_step()
        if not np.isfinite(lm_loss):
            raise FloatingPointError(
                f"training loss became {lm_loss} at step {step + 1}; lower optim.lr or set trainer.grad_clip, and "
                f"resume from the last checkpoint with resume=auto"
            )
        return {"lr": lr, "lm_loss": lm_loss, "aux": aux, "stats": stats, "grad_norm": float(grad_norm)}

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
            while st.step < tc.max_steps:
                self._step_rng = _rng_state()
                t0 = time.perf_counter()
                out = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                st.elapsed_s += time.perf_counter() - t0
                st.step += 1
                self._step_rng = _rng_state()  # an interrupt from here on saves this step: the RNG as it leaves it
                st.tokens += tokens_per_step
                st.flops += self.flops_per_token * tokens_per_step
                st.loss_sum += out["lm_loss"]
                st.loss_count += 1
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
                              "train_loss": st.loss_sum / st.loss_count, "lr": out["lr"], "grad_norm": out["grad_norm"],
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
                if final or (tc.ckpt_interval > 0 and st.step % tc.ckpt_interval == 0):
                    self._step_rng = _rng_state()
                    self.save()
        except KeyboardInterrupt:
            # The last complete step is saved so that resume=auto continues exactly from it.
            if st.step > 0 and not (self.run_dir / "checkpoints" / f"step_{st.step}").exists():
                path = self.save()
                print(f"\ninterrupted: saved {path}; continue with resume=auto")
            self._write_run_file("interrupted")
            raise
        except BaseException as e:
            self._write_run_file("failed", {"error": f"{type(e).__name__}: {e}"})
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
                   "metrics": str(self.logger.path), "checkpoint": str(checkpoint_dirs(self.run_dir)[-1][1])}
        self._write_run_file("finished", summary)
        return summary

    def _write_run_file(self, status: str, summary: Optional[dict] = None) -> None:
        """run.json: what a report needs besides the curves (sizes, FLOPs per token, data identity, status)."""
        if not self.par.is_main:
            return
        info = {"status": status, "params_total": self.params.total, "params_active": self.params.active,
                "flops_per_token": self.flops_per_token, "data_fingerprint": self.data.fingerprint,
                "vocab_size": self.model_cfg.vocab_size, "sparse_layers": list(self.model_cfg.sparse_layers),
                "twin": self.cfg.twin, "group": self.cfg.logger.group,
                "config": {**self.cfg.to_dict(), "model": self.model_cfg.to_dict()}, "summary": summary}
        tmp = self.run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.run_dir / RUN_FILE)


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
