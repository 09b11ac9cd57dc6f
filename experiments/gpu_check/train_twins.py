"""Step f_train_twins: 50 training steps of a ~100M-parameter dense model and of its FLOP-matched MoE twin, side
by side, with tokens/s and MFU; then whether one dropless MoE step synchronises with the host.

Built without Hydra (the GPU machine may lack it): moe.config and moe.twins give the models (the twin is
moe.twins.build_twin(base, "moe_e8_k2"): 8 experts, top-2, the dense model's training FLOPs per token within 1%,
its default router), a plain loop gives the steps: bf16 autocast, dispatcher=auto (triton on CUDA), AdamW
(fused on CUDA), gradient clipping, random tokens (throughput does not depend on them). The two models train in
alternating chunks of 10 steps, the first chunk of each a warm-up (compilation, autotuning), so that both see
the same machine state. MFU = moe.flops training FLOPs per token x tokens/s / the datasheet bf16 peak.

The host-sync check runs one whole step (forward, backward, clipping, optimizer) of the twin under
torch.cuda.set_sync_debug_mode("error"): any synchronising CUDA call raises, and the frame of ours nearest to it
is reported. It is run for the twin as trained and again without its balancing loss, to tell the router's
statistics from the dispatch.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path

import torch

from experiments.gpu_check.step_io import StepRecord, device, parse_args, sync

REPO = str(Path(__file__).resolve().parents[2])
CHUNK, CHUNKS = 10, 5  # 5 chunks of 10 steps per model; the first is the warm-up
DRY_CHUNK, DRY_CHUNKS = 1, 2
TWIN = "moe_e8_k2"


def base_config(dry_run: bool):
    from moe.config import ModelConfig

    if dry_run:
        return ModelConfig(vocab_size=256, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=32,
                           activation="silu", glu=True, norm="rmsnorm", position="rope")
    # Llama-style, 12 x 768, SwiGLU 2048, 32k vocabulary (tied): 110M parameters
    return ModelConfig(vocab_size=32000, n_layer=12, d_model=768, n_head=12, d_ff=2048, max_seq_len=1024,
                       activation="silu", glu=True, norm="rmsnorm", position="rope")


class Run:
    """One model, its optimizer and its batches: `step()` is one training step, returning the loss (no read)."""

    def __init__(self, cfg, dev: torch.device, batch: int, seq: int, seed: int = 0):
        from moe.model import Transformer

        torch.manual_seed(seed)
        self.cfg, self.dev = cfg, dev
        self.model = Transformer(cfg).to(dev)
        fused = dev.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=fused)
        g = torch.Generator(device=dev).manual_seed(seed)
        self.batches = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev, generator=g) for _ in range(4)]
        self.n = 0

    def step(self) -> torch.Tensor:
        tokens = self.batches[self.n % len(self.batches)]
        self.n += 1
        with torch.autocast(self.dev.type, dtype=torch.bfloat16):
            out = self.model(tokens[:, :-1], tokens[:, 1:])
            loss = out.total_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def nearest_frame(tb) -> str:
    """The innermost frame of this repository in a traceback (where our code asked for the sync)."""
    ours = [f for f in traceback.extract_tb(tb) if f.filename.startswith(REPO) and "gpu_check" not in f.filename]
    f = ours[-1] if ours else traceback.extract_tb(tb)[-1]
    return f"{f.filename.replace(REPO + '/', '')}:{f.lineno} ({f.name}: {(f.line or '').strip()})"


def syncs_in_step(run: Run) -> str:
    """'' when a whole training step makes no host synchronisation, else where the first one happened."""
    sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.step()
    except RuntimeError as e:
        return f"{str(e).splitlines()[0][:160]} at {nearest_frame(e.__traceback__)}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sync()
    return ""


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    rec.put("dry_run", a.dry_run)
    dev = device()
    if dev.type != "cuda" and not a.dry_run:
        rec.skip("no CUDA")
        return
    from experiments.peak_flops import peak_flops
    from moe.dispatch import describe_dispatch
    from moe.flops import count_params, flops_per_token
    from moe.twins import build_twin

    base = base_config(a.dry_run)
    batch, seq = (2, base.max_seq_len) if a.dry_run else (16, 1024)
    chunk, chunks = (DRY_CHUNK, DRY_CHUNKS) if a.dry_run else (CHUNK, CHUNKS)
    cfgs = {"dense": build_twin(base, "dense"), TWIN: build_twin(base, TWIN)}
    cfgs[TWIN] = cfgs[TWIN].replace(moe=dataclasses.replace(cfgs[TWIN].moe, dispatcher="auto"))
    runs = {name: Run(cfg, dev, batch, seq) for name, cfg in cfgs.items()}
    peak = peak_flops(dev, bf16=True)
    for name, cfg in cfgs.items():
        rec.put(f"{name}_params", count_params(cfg).total)
        rec.put(f"{name}_training_flops_per_token", flops_per_token(cfg, seq).training)
    rec.put("dispatch", describe_dispatch(runs[TWIN].model))
    rec.put("tokens_per_step", batch * seq)
    print(f"dense {rec.numbers['dense_params'] / 1e6:.1f}M parameters, {TWIN} {rec.numbers[TWIN + '_params'] / 1e6:.1f}M; "
          f"{batch}x{seq} tokens per step; {rec.numbers['dispatch']}", flush=True)
    seconds = {name: 0.0 for name in runs}
    losses = {name: [] for name in runs}
    for c in range(chunks):
        order = list(runs) if c % 2 == 0 else list(reversed(runs))  # alternate which model goes first
        for name in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(chunk):
                losses[name].append(runs[name].step())
            sync()
            if c > 0:  # chunk 0: compilation and autotuning
                seconds[name] += time.perf_counter() - t0
        print(f"chunk {c}: " + ", ".join(f"{n} loss {float(losses[n][-1]):.3f}" for n in runs), flush=True)
    timed_tokens = (chunks - 1) * chunk * batch * seq
    for name in runs:
        tps = timed_tokens / seconds[name]
        rec.put(f"{name}_tokens_per_s", tps)
        rec.put(f"{name}_mfu", rec.numbers[f"{name}_training_flops_per_token"] * tps / peak if peak else None)
        rec.put(f"{name}_loss_first_last", [float(losses[name][0]), float(losses[name][-1])])
        rec.put(f"{name}_steps", len(losses[name]))
    rec.put("moe_vs_dense_tokens_per_s", rec.numbers[f"{TWIN}_tokens_per_s"] / rec.numbers["dense_tokens_per_s"])
    for name in runs:
        mfu = rec.numbers[f"{name}_mfu"]
        print(f"{name}: {rec.numbers[f'{name}_tokens_per_s']:.0f} tokens/s, MFU "
              f"{'—' if mfu is None else f'{mfu:.1%}'}", flush=True)
    finite = all(torch.isfinite(torch.stack(v)).all() for v in losses.values())
    rec.check("losses_finite", bool(finite), "every step's loss is finite")
    if dev.type != "cuda":
        rec.put("host_sync", "not checked: CPU dry run (torch.cuda.set_sync_debug_mode needs CUDA)")
        rec.finish()
        return
    where = syncs_in_step(runs[TWIN])
    rec.check("no_host_sync", not where, "a whole dropless training step of the twin ran with "
              "set_sync_debug_mode('error')" if not where else where)
    cfg = cfgs[TWIN]
    quiet = cfg.replace(moe=dataclasses.replace(cfg.moe, router=dataclasses.replace(cfg.moe.router, aux_loss_coef=0.0)))
    plain = Run(quiet, dev, batch, seq)
    plain.step()  # warm: compiled kernels, allocator
    where = syncs_in_step(plain)
    rec.put("host_sync_without_balancing_loss", where or "none")
    rec.finish()


if __name__ == "__main__":
    main()
