"""python -m experiments.bench_step [--twins dense,moe_e8_k2,...] [--reps 7] [--threads 1] [--profile] [--compile]
                                 [--clock wall|cpu] [--optimizer trainer|foreach|fused]

The bare training step (forward, backward, clip, AdamW; no trainer, no logging) of the demo's dense base and of
its FLOP-matched MoE twins, measured side by side in one process, as ratios against dense.

Shapes are the demo's (conf/experiment/demo.yaml): model=tiny_dense, byte tokens (vocabulary 257), batch 16 x
128. Twins come from experiments.twins (moe_e{E}_k{k}, expert width solved so the training FLOPs per token match
dense within 1%), so moe_e256_k8 has experts of width 37.

Protocol: the models' steps are interleaved round-robin inside each repetition (the starting one rotates, so a
burst of load from another process hits every model alike), one warm-up repetition, then `--reps` timed ones;
the ratio is min(twin) / min(dense) and the median of the per-repetition pairs. One thread by default.

--profile adds a split of one step into parts (torch.profiler, self CPU time of each aten op, forward and
backward, summed into: attention/dense, router, dispatch (gather/scatter/sort), expert GEMMs, statistics,
optimizer, other); see `PART_RULES`.
--compile times the steps with every block compiled (moe.compile.compile_blocks) on dense and twins alike.
--optimizer: `trainer` (default) clips and updates as trainer=single does (experiments.optim.build_optimizer with
OptimConfig's defaults, then torch's global norm and experiments.optim.clipped_update: the fused kernel with the
clip as its grad_scale); `foreach` and `fused` run torch's clip_grad_norm_ (its own pass rescaling every gradient)
and then AdamW on that kernel: the trainer's path before issue 16/21 (foreach was its default) and its opt-in.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from experiments.config import OptimConfig
from experiments import allocator
from experiments.optim import build_optimizer, clipped_update
from moe.twins import build_twin
from moe.config import ModelConfig
from moe.model import Transformer
from moe.presets import get_preset

DEMO_TWINS = "dense,moe_e8_k2,moe_e16_k2,moe_e32_k2,moe_e64_k2,moe_e256_k8"
BYTE_VOCAB = 257  # experiments.tokenizer.ByteTokenizer.vocab_size


@dataclass
class StepSetup:
    """What one bare step needs: the demo's shapes and the optimizer's defaults."""
    batch: int = 16  # sequences per step (trainer.batch_size of the demo)
    seq_len: int = 128  # tokens per sequence (trainer.seq_len of the demo)
    max_norm: float = 1.0  # gradient clipping, as the trainer does
    seed: int = 0  # weights and batch


def twin_config(name: str, setup: StepSetup) -> ModelConfig:
    """The demo's base (tiny_dense with byte tokens) or one of its twins (experiments.twins.build_twin).
    NAME/mM rounds the expert width to a multiple of M (e.g. moe_e64_k2/m4: f = 180, whose rows are 16-byte
    aligned, so the grouped GEMM's `auto` takes torch's grouped_mm instead of the per-expert loop)."""
    base = get_preset("tiny_dense").replace(vocab_size=BYTE_VOCAB, max_seq_len=setup.seq_len)
    twin, _, multiple = name.partition("/m")
    if multiple and not multiple.isdigit():
        raise ValueError(f"--twins item {name!r}: write NAME/mM with M an integer, e.g. moe_e64_k2/m4")
    return build_twin(base, twin, seq_len=setup.seq_len, multiple_of=int(multiple or 1))


OPTIMIZERS = ("trainer", "foreach", "fused")  # --optimizer: the trainer's update now, and the two before it


def make_update(model: torch.nn.Module, kind: str, max_norm: float
                ) -> tuple[torch.optim.Optimizer, Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]:
    """(optimizer, clip, update) of one of OPTIMIZERS: clip() returns the global gradient norm (foreach and fused:
    torch's clip_grad_norm_, which also rescales every gradient), update(norm) steps (the trainer's: clipped in
    the update, gradients cleared, as experiments.engines.single does)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind!r}: choose one of {OPTIMIZERS}")
    params = list(model.parameters())
    if kind == "trainer":
        optimizer = build_optimizer(model, OptimConfig())

        def norm() -> torch.Tensor:
            return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

        return optimizer, norm, lambda n: clipped_update(optimizer, n, max_norm)
    optimizer = build_optimizer(model, OptimConfig(fused="true" if kind == "fused" else "false"))

    def clip() -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)

    return optimizer, clip, lambda n: optimizer.step()


def make_step(cfg: ModelConfig, setup: StepSetup, wrap: Optional[Callable] = None,
              optimizer_kind: str = "trainer") -> tuple[Callable[[], float], Transformer]:
    """A closure running one bare training step of a fresh model of `cfg`; returns it and the model."""
    torch.manual_seed(setup.seed)
    model = Transformer(cfg)
    model.train()
    optimizer, clip, update = make_update(model, optimizer_kind, setup.max_norm)
    if wrap is not None:
        wrap(model)
    g = torch.Generator().manual_seed(setup.seed)
    x = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=g)

    def step() -> float:
        out = model(x, y)
        loss = out.total_loss
        loss.backward()
        update(clip())
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each fn on `clock`, round-robin within each repetition, rotating the starting fn."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = clock()
            fns[n]()
            dt = clock() - t0
            if r >= warmup:
                times[n].append(dt)
    return times


def ratios(times: dict[str, list[float]], ref: str = "dense") -> dict[str, tuple[float, float, float]]:
    """name -> (min ms, min ratio vs ref, median of per-repetition ratios)."""
    out = {}
    for n, ts in times.items():
        pairs = [a / b for a, b in zip(ts, times[ref])]
        out[n] = (min(ts) * 1e3, min(ts) / min(times[ref]), statistics.median(pairs))
    return out


# ------------------------------------------------------------------------------------------------ the split

# (a piece of a Python frame's file path, the part it belongs to), in order. An op's self time goes to the part of
# the innermost frame of its call stack that contains one of these; a backward op's to the part of the forward op
# that made its autograd node (same sequence number). So `dispatch` is the dispatcher's own gathers, scatters and
# weighting, `expert GEMMs` everything inside moe.experts / moe.segment_matmul (matmuls, activation, biases), the
# counterpart of `dense FFN` (moe.ffn) in the dense model.
PART_RULES: list[tuple[str, str]] = [
    ("routing/stats.py", "statistics"),
    ("routing/", "router"),
    ("moe/dispatch/", "dispatch"),
    ("moe/segment_matmul.py", "expert GEMMs"),
    ("moe/experts.py", "expert GEMMs"),
    ("moe/layer.py", "MoE layer (other)"),
    ("moe/ffn.py", "dense FFN"),
    ("torch/optim/", "optimizer"),
    ("clip_grad", "optimizer"),
    ("experiments/optim.py", "optimizer"),  # clipped_update: the clip folded into the update
    ("moe/", "attention/dense/other"),
]
PARTS = ("attention/dense/other", "dense FFN", "router", "dispatch", "expert GEMMs", "statistics", "MoE layer (other)",
         "optimizer", "loop (Python, zero_grad)")


def _part_of_frame(name: str) -> Optional[str]:
    return next((part for piece, part in PART_RULES if piece in name), None)


def split_events(events) -> dict[str, float]:
    """torch.profiler FunctionEvents (recorded with_stack=True) -> ms of self CPU time per part (PART_RULES)."""
    def walk(ev, by_seq):
        while ev is not None:
            if ev.name.startswith("autograd::engine::evaluate_function"):
                return by_seq.get(ev.sequence_nr, "attention/dense/other")
            part = _part_of_frame(ev.name)
            if part is not None:
                return part
            ev = ev.cpu_parent
        return None

    by_seq: dict[int, str] = {}
    for ev in events:  # forward ops that made an autograd node
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            part = walk(ev, {})
            if part is not None:
                by_seq.setdefault(ev.sequence_nr, part)
    parts = dict.fromkeys(PARTS, 0.0)
    for ev in events:
        part = walk(ev, by_seq) or "loop (Python, zero_grad)"
        parts[part] = parts.get(part, 0.0) + ev.self_cpu_time_total / 1e3
    return parts


def profile_step(step: Callable[[], object]) -> dict[str, float]:
    """ms of self CPU time per part of one step (after the caller's warm-up). The Python tracer inflates the
    Python parts; compare parts between models, not with the unprofiled step times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        step()
    return split_events(prof.events())


def profile_parts(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """name -> part -> median ms over `rounds` profiled steps, the models interleaved round-robin as in the
    timing (one profiled step of a loaded machine is noise; the median of a few is a split)."""
    if rounds < 1:
        raise ValueError(f"--profile-rounds={rounds} must be >= 1")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in steps}
    for _ in range(rounds):
        for n, step in steps.items():
            runs[n].append(profile_step(step))
    return {n: {part: statistics.median(r[part] for r in rs) for part in rs[0]} for n, rs in runs.items()}


def start(module: str, argv: Optional[list[str]], args: argparse.Namespace) -> list[str]:
    """What a step benchmark does first with its parsed --allocator, --reps, --threads and --twins: re-run under
    the allocator, check the repetitions, set the threads; returns the model names, dense first."""
    if args.allocator != "system":
        allocator.reexec(module, list(argv if argv is not None else sys.argv[1:]), args.allocator)
    if args.reps < 3:
        raise ValueError(f"--reps={args.reps} must be >= 3 for a median of pairs")
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.twins.split(",") if n.strip()]
    return names if "dense" in names else ["dense"] + names


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--twins", default=DEMO_TWINS, help=f"comma-separated twin names (default {DEMO_TWINS})")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (>= 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--profile", action="store_true", help="also split one step of each twin into parts")
    ap.add_argument("--profile-rounds", type=int, default=3, help="profiled steps per model (median per part)")
    ap.add_argument("--compile", action="store_true", help="compile every block (moe.compile) of every twin")
    ap.add_argument("--optimizer", default="trainer", choices=OPTIMIZERS,
                    help="trainer: the trainer's clip and AdamW (fused, clip in the update); foreach / fused: torch's "
                         "clip_grad_norm_ then AdamW on that kernel (the path before issue 16/21)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="wall: perf_counter; cpu: this thread's CPU time (with --threads 1 all the step's work, and "
                         "not the time other processes hold the core: steadier on a shared machine)")
    ap.add_argument("--allocator", default="auto", choices=allocator.CHOICES,
                    help="re-run once with this allocator (experiments.allocator; system: as the trainer runs)")
    args = ap.parse_args(argv)
    names = start("experiments.bench_step", argv, args)
    setup = StepSetup()
    wrap = None
    if args.compile:
        from moe.compile import compile_blocks

        wrap = compile_blocks
    steps = {n: make_step(twin_config(n, setup), setup, wrap, args.optimizer)[0] for n in names}
    print(f"# bare step, demo shapes (tiny_dense, byte tokens, {setup.batch}x{setup.seq_len}), "
          f"{args.threads} thread(s), torch {torch.__version__}, compile={args.compile}, "
          f"optimizer {args.optimizer}, clock {args.clock}, allocator: {allocator.current()}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}, load {os.getloadavg()[0]:.2f}")
    if args.clock == "cpu" and args.threads != 1:
        raise ValueError("--clock cpu times the calling thread only: use it with --threads 1")
    times = interleaved(steps, args.reps, clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
    print("| model | min ms | vs dense (min) | vs dense (median of pairs) |\n|---|---:|---:|---:|")
    for n, (ms, r_min, r_med) in ratios(times).items():
        print(f"| {n} | {ms:.1f} | {r_min:.3f}x | {r_med:.3f}x |")
    if args.profile:
        table = profile_parts(steps, args.profile_rounds)
        head = f"part (ms, self CPU, profiled; median of {args.profile_rounds} interleaved steps)"
        print(f"\n| {head} | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
        for p in PARTS:
            print(f"| {p} | " + " | ".join(f"{table[n].get(p, 0.0):.1f}" for n in names) + " |")
        print("| total | " + " | ".join(f"{sum(table[n].values()):.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
