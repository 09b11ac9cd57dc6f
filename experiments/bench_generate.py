"""python -m experiments.bench_generate [--batches 1,8] [--prompt 16] [--new 64] [--reps 7] [--append FILE]

Generation tokens/s, measured side by side in one process on one set of weights:

- Switchyard without the KV cache (`Transformer.generate(use_cache=False)`: the whole window re-run per token);
- Switchyard with the KV cache (the default);
- transformers' `generate` on the same weights exported with upcycle.export.export_hf (tiny_moe is a Llama-family
  MoE, so MixtralForCausalLM; sdpa attention, its DynamicCache).

All three are greedy, produce exactly --new tokens per row (no eos), and their tokens are checked equal before
anything is timed. A batch of B prompts of --prompt tokens; with --padded also a batch of B prompts of different
lengths (left-padded, attention mask), the case the mask costs something. tokens/s = B * new / wall time, prefill
included. Protocol: the three interleaved round-robin (the first rotating), one warm-up repetition, then --reps
timed ones; the table gives the median tokens/s and the median of the per-repetition ratios, which the load of
other processes disturbs less than the absolute numbers. One torch thread by default.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from experiments import allocator
from moe.generation import left_pad
from moe.model import Transformer
from moe.presets import PRESETS

OURS_PLAIN, OURS_CACHE, HF = "switchyard, no cache", "switchyard, KV cache", "transformers"
NAMES = (OURS_PLAIN, OURS_CACHE, HF)


@dataclass
class Case:
    batch: int  # B prompts
    padded: bool  # prompts of different lengths (left-padded) instead of B prompts of the same length
    tokens_per_s: dict[str, float]  # implementation -> median tokens/s
    ratios: dict[str, float]  # "cache / no cache", "cache / transformers": median of the per-repetition ratios

    @property
    def label(self) -> str:
        return f"{self.batch} (lengths differ, left-padded)" if self.padded else str(self.batch)


def machine() -> list[str]:
    """`lscpu | head` (or /proc/cpuinfo's model name), the torch and transformers versions, the load."""
    import transformers

    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        keep = ("Architecture", "CPU(s):", "Model name", "Thread(s) per core", "Core(s) per socket", "Flags")
        cpu = [ln.strip() for ln in lines[:20] if ln.startswith(keep) and not ln.startswith("Flags")]
    except (OSError, subprocess.CalledProcessError):
        cpu = [f"{os.cpu_count()} logical cores (lscpu unavailable)"]
    load = os.getloadavg()[0]
    return cpu + [f"torch {torch.__version__}, transformers {transformers.__version__}, "
                  f"{torch.get_num_threads()} torch thread(s), allocator: {allocator.current()}",
                  f"load average (1 min) at the start: {load:.2f} ({load / (os.cpu_count() or 1):.2f} per core)"]


def prompts(batch: int, length: int, padded: bool, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """(idx [B, S], attention_mask [B, S]); padded: lengths spread from length / 4 to length."""
    g = torch.Generator().manual_seed(seed)
    lengths = ([max(1, length // 4 + (length - length // 4) * b // max(1, batch - 1)) for b in range(batch)]
               if padded else [length] * batch)
    return left_pad([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], pad_id=0)


def load_transformers(model: Transformer, folder: Path):
    """The exported weights in transformers, fp32, sdpa attention, greedy, in eval mode."""
    import transformers

    from upcycle.export import export_hf

    export_hf(model, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    return hf


def runners(model: Transformer, hf, idx: Tensor, mask: Tensor, new: int) -> dict[str, Callable[[], Tensor]]:
    """Each implementation's greedy generation of exactly `new` tokens per row -> [B, S + new]."""
    def hf_generate() -> Tensor:
        with torch.no_grad():
            return hf.generate(idx, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)

    return {
        OURS_PLAIN: lambda: model.generate(idx, new, temperature=0, attention_mask=mask, use_cache=False),
        OURS_CACHE: lambda: model.generate(idx, new, temperature=0, attention_mask=mask),
        HF: hf_generate,
    }


def interleaved(fns: dict[str, Callable[[], Tensor]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, round-robin with the first one rotating; warm-up repetitions dropped."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        start = r % len(names)
        for n in names[start:] + names[:start]:
            t0 = time.perf_counter()
            fns[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def bench_case(model: Transformer, hf, batch: int, padded: bool, length: int, new: int, reps: int,
               seed: int) -> Case:
    idx, mask = prompts(batch, length, padded, model.cfg.vocab_size, seed)
    fns = runners(model, hf, idx, mask, new)
    outs = {n: f() for n, f in fns.items()}
    for n in (OURS_PLAIN, HF):  # one set of weights, greedy: the same tokens, or the timing compares nothing
        if not torch.equal(outs[n], outs[OURS_CACHE]):
            raise AssertionError(f"batch {batch}: {n} generated other tokens than {OURS_CACHE}")
    times = interleaved(fns, reps)
    tokens = batch * new
    tps = {n: statistics.median(tokens / t for t in ts) for n, ts in times.items()}
    pairs = lambda a, b: statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))  # speed a / speed b
    return Case(batch, padded, tps, {"cache / no cache": pairs(OURS_CACHE, OURS_PLAIN),
                                     "cache / transformers": pairs(OURS_CACHE, HF)})


def to_markdown(cases: list[Case]) -> str:
    head = ("| batch | " + " | ".join(f"{n} tok/s" for n in NAMES)
            + " | KV cache ÷ no cache | KV cache ÷ transformers |")
    rows = [head, "|" + "---|" * (len(NAMES) + 3)]
    for c in cases:
        rows.append(f"| {c.label} | " + " | ".join(f"{c.tokens_per_s[n]:.0f}" for n in NAMES)
                    + f" | {c.ratios['cache / no cache']:.2f}× | {c.ratios['cache / transformers']:.2f}× |")
    return "\n".join(rows) + "\n"


def run(batches: list[int], length: int = 16, new: int = 64, reps: int = 7, threads: int = 1, seed: int = 0,
        padded: bool = True, preset: str = "tiny_moe",
        log: Callable[[str], None] = print) -> tuple[list[Case], list[str]]:
    if reps < 1 or new < 1 or length < 1:
        raise ValueError(f"--reps={reps}, --new={new} and --prompt={length} must be at least 1")
    if preset not in PRESETS:
        raise ValueError(f"--preset={preset!r} is not a preset; choose one of {sorted(PRESETS)}")
    if length + new - 1 > PRESETS[preset].max_seq_len:
        raise ValueError(f"--prompt={length} + --new={new} exceed {preset}'s max_seq_len="
                         f"{PRESETS[preset].max_seq_len}; past it the cache hands over to the window")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        header = machine()
        for h in header:
            log(h)
        torch.manual_seed(seed)
        model = Transformer(PRESETS[preset]).eval()
        cases = []
        with tempfile.TemporaryDirectory() as tmp:
            hf = load_transformers(model, Path(tmp) / "hf")
            for b in batches:
                for pad in ([False, True] if padded and b > 1 else [False]):
                    c = bench_case(model, hf, b, pad, length, new, reps, seed)
                    log(to_markdown([c]).splitlines()[-1])
                    cases.append(c)
    finally:
        torch.set_num_threads(old_threads)
    return cases, header


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_generate", description=__doc__.split("\n\n")[1])
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row (the longest, when padded)")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny_moe", help="a Llama-family preset (exported to transformers)")
    p.add_argument("--no-padded", action="store_true", help="skip the batches of prompts of different lengths")
    p.add_argument("--append", default=None, help="append the table, machine, command and date to this markdown file")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    started = datetime.datetime.now(datetime.timezone.utc)
    cases, header = run(batches, a.prompt, a.new, a.reps, a.threads, a.seed, not a.no_padded, a.preset)
    table = to_markdown(cases)
    print(table)
    if a.append:
        argv_text = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
        block = [f"\n### {a.preset}, prompt {a.prompt}, {a.new} new tokens, {a.reps} repetitions "
                 f"({started:%Y-%m-%d %H:%M} UTC)\n", "```", f"python -m experiments.bench_generate {argv_text}".rstrip(),
                 "```", "", *(f"{h}  " for h in header), "", table]
        with open(a.append, "a", encoding="utf-8") as fh:
            fh.write("\n".join(block))
        print(f"appended to {a.append}")


if __name__ == "__main__":
    main()
