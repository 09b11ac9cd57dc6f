"""python -m experiments.bench_engines [--preset gpt3_125m] [--n-layer 5] [--experts 8] [--expert-hidden 1536]
    [--procs 1,2,4] [--ep 1,2] [--steps 5] [--repeats 4] [--time-procs 2] [--skip-memory] [--skip-time]

What the engines (experiments.engines) hold and how long their steps take, measured on real objects:

- Memory. For each world size in --procs (1: trainer=single; more: trainer=fsdp, and again at each expert-parallel
  degree in --ep that divides it), one torchrun launch builds experiments.trainer.Trainer from the composed Hydra
  config, exactly as `python -m experiments.train` does, and runs optimizer steps (so AdamW's moments exist). Each
  rank then sums the bytes of its optimizer's parameters (the local shard of a DTensor: `to_local()`), of the
  optimizer state's tensors (the same), and reads its peak RSS (getrusage) and its current RSS (/proc/self/statm).
  The table gives the maximum over the ranks and its fraction of the one-process figure.
- Step time. trainer=ddp against trainer=fsdp on --time-procs processes, the same model and global batch, launches
  interleaved (--repeats pairs, the first engine alternating); each launch times `Trainer.train_step` after a
  barrier, the first (warm-up) step excluded, and takes the median over its steps of the slowest rank's time.
  Ratios fsdp / ddp: min-over-min and the median of the per-pair ratios.

The model is a preset resized with Hydra overrides: by default gpt3_125m's shape (d = 768, 12 heads of 64, GELU,
LayerNorm, learned positions, tied embeddings) with 5 blocks, every FFN an MoE of 8 experts of hidden 1536 (half
the dense FFN), top-2 (about 108M parameters with the byte tokenizer's 257-token vocabulary). The data is a small
generated text file, byte-tokenized, so memory is the weights' and the optimizer's. Numbers go to stdout as
Markdown tables (docs/benchmarks.md records one run).

    python -m experiments.bench_engines --worker --out DIR [--steps N] -- OVERRIDES   # one rank (under torchrun)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ one rank


def local_bytes(t) -> int:
    """Bytes of this rank's piece of t: a DTensor's local shard (FSDP2), else the whole tensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def held_bytes(optimizer) -> dict[str, int]:
    """What this rank holds in the optimizer's parameters and state: local bytes, local elements, and the bytes of
    the distinct storages behind them (FSDP2 pads each shard to an equal chunk; the padding shows there)."""
    params = list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
    storages: dict[int, int] = {}
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        s = local.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    state_bytes = 0
    for values in optimizer.state.values():
        for v in values.values():
            if hasattr(v, "numel"):
                state_bytes += local_bytes(v)
    return {"param_bytes": sum(local_bytes(p) for p in params),
            "param_elements": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
            "param_storage_bytes": sum(storages.values()),
            "optimizer_state_bytes": state_bytes,
            "optimizer_state_tensors": sum(len(v) for v in optimizer.state.values()),
            "param_tensors": len(params)}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(out_dir: Path, steps: int, overrides: list[str]) -> None:
    """One rank: the Trainer of the composed config, `steps` timed train steps, then what it holds."""
    import torch
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from experiments.config import run_config_from_dict
    from experiments.hydra_conf import CONFIG_MODULE, register_configs
    from experiments.trainer import Trainer
    from moe.flops import count_params

    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    rank = int(os.environ.get("RANK", "0"))
    run = run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True),
                               str(out_dir / "run"))
    t0 = time.perf_counter()
    trainer = Trainer(run)
    build_s = time.perf_counter() - t0
    times = []
    try:
        for _ in range(steps):
            trainer.ranks.barrier("bench: the ranks start the step together")
            t0 = time.perf_counter()
            out = trainer.train_step()
            times.append(time.perf_counter() - t0)
            trainer.state.step += 1
            if not out["grad_norm"] > 0:
                raise RuntimeError(f"step {trainer.state.step}: gradient norm {out['grad_norm']}")
        record = {"rank": rank, "world": trainer.ranks.world_size, "kind": run.trainer.kind,
                  "ep": run.model.moe.expert_parallel, "params_total": count_params(trainer.model_cfg).total,
                  "build_s": build_s, "step_s": times, "lm_loss": out["lm_loss"],
                  **held_bytes(trainer.optimizer),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_bytes": current_rss_bytes(), "torch": torch.__version__}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        trainer.engine.close()


# ------------------------------------------------------------------------------------------ launches


def corpus(folder: Path) -> Path:
    """A small deterministic text file (~20 kB; the byte tokenizer prepares it in milliseconds)."""
    path = folder / "corpus.txt"
    if not path.exists():
        lines = [f"line {i}: the quick brown fox jumps over the lazy dog, {'and runs ' * (i % 5)}home {i % 7}."
                 for i in range(300)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def model_overrides(preset: str, n_layer: Optional[int] = None, experts: int = 8, expert_hidden: Optional[int] = None,
                    top_k: int = 2, layers: str = "all") -> list[str]:
    """Hydra overrides for a preset resized: n_layer blocks, `layers` of them MoE with `experts` experts of hidden
    expert_hidden, top-k routing (experts=0: dense)."""
    out = [f"model={preset}"]
    if n_layer:
        out.append(f"model.n_layer={n_layer}")
    if experts:
        out += [f"model.moe.layers={layers}", f"model.moe.num_experts={experts}", f"model.moe.router.top_k={top_k}"]
        if expert_hidden:
            out.append(f"model.moe.expert_hidden={expert_hidden}")
    else:
        out.append("model.moe.layers=none")
    return out


def run_overrides(data: Path, batch: int, seq: int, steps: int) -> list[str]:
    return ["data=text", f"data.path={data}", "data.tokenizer=byte", "trainer.device=cpu", "trainer.progress=false",
            f"trainer.batch_size={batch}", f"trainer.seq_len={seq}", f"trainer.max_steps={steps}",
            "trainer.eval_batches=1", "trainer.eval_interval=0", "trainer.threads=1", "logger=none",
            "optim.warmup_steps=0", "optim.schedule=constant"]


def launch(nproc: int, kind: str, ep: int, overrides: list[str], steps: int, workdir: Path,
           timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """torchrun --nproc_per_node=nproc of the worker (trainer=kind, model.moe.expert_parallel=ep); every rank's
    record, rank order. A failed launch raises with both outputs' tails."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [*overrides, f"trainer={kind}", f"model.moe.expert_parallel={ep}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "experiments.bench_engines", "--worker", "--out", str(workdir), "--steps", str(steps), "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWITCHYARD_CACHE": str(workdir.parent / "cache")}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer={kind} ep={ep} on {nproc} processes failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]


def measure_memory(nproc: int, kind: str, ep: int, overrides: list[str], workdir: Path, steps: int = 1) -> dict:
    """One launch's per-rank bytes, with the maximum and minimum over the ranks."""
    ranks = launch(nproc, kind, ep, overrides, steps, workdir)
    keys = ("param_bytes", "param_storage_bytes", "optimizer_state_bytes", "peak_rss_bytes", "rss_bytes")
    summary = {"procs": nproc, "kind": kind, "ep": ep, "params_total": ranks[0]["params_total"], "ranks": ranks}
    for k in keys:
        summary[k] = max(r[k] for r in ranks)
        summary[k + "_min"] = min(r[k] for r in ranks)
    summary["held_bytes"] = max(r["param_bytes"] + r["optimizer_state_bytes"] for r in ranks)
    return summary


def step_time(record_ranks: list[dict]) -> float:
    """The median over the timed steps (the first, a warm-up, excluded) of the slowest rank's step time."""
    steps = list(zip(*(r["step_s"] for r in record_ranks)))[1:]
    return statistics.median(max(s) for s in steps)


# ------------------------------------------------------------------------------------------ tables


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def memory_table(rows: list[dict]) -> str:
    """One row per launch: the maximum over the ranks, fractions of the one-process launch's figure."""
    base = next(r for r in rows if r["procs"] == 1)
    out = ["| processes | trainer | ep | parameters per rank | optimizer state per rank | optimizer / parameters | "
           "parameters + optimizer per rank | of 1 process | 1 / processes | parameter storage incl. padding | "
           "peak RSS | RSS after the step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = max(x["optimizer_state_bytes"] / x["param_bytes"] for x in r["ranks"])
        out.append(
            f"| {r['procs']} | {r['kind']} | {r['ep']} | {_mb(r['param_bytes'])} | {_mb(r['optimizer_state_bytes'])} "
            f"| {ratio:.4f} | {_mb(r['held_bytes'])} | {r['held_bytes'] / base['held_bytes']:.4f} | "
            f"{1 / r['procs']:.4f} | {_mb(r['param_storage_bytes'])} | {_mb(r['peak_rss_bytes'])} | "
            f"{_mb(r['rss_bytes'])} |")
    return "\n".join(out)


def time_table(pairs: list[dict[str, float]], order: list[str]) -> str:
    out = ["| pair | first launched | ddp median step | fsdp median step | fsdp / ddp |", "|---|---|---|---|---|"]
    for i, (p, first) in enumerate(zip(pairs, order)):
        out.append(f"| {i + 1} | {first} | {p['ddp'] * 1e3:.0f} ms | {p['fsdp'] * 1e3:.0f} ms | "
                   f"{p['fsdp'] / p['ddp']:.2f} |")
    ddp_min, fsdp_min = min(p["ddp"] for p in pairs), min(p["fsdp"] for p in pairs)
    ratios = [p["fsdp"] / p["ddp"] for p in pairs]
    held = {k: max(r["param_bytes"] + r["optimizer_state_bytes"] for r in pairs[0][k + "_ranks"])
            for k in ("ddp", "fsdp")}
    out.append(f"\nparameters + optimizer state per rank in these launches: ddp {_mb(held['ddp'])}, fsdp "
               f"{_mb(held['fsdp'])}.  ")
    out.append(f"fsdp / ddp: {fsdp_min / ddp_min:.2f} min-over-min ({fsdp_min * 1e3:.0f} ms / {ddp_min * 1e3:.0f} ms), "
               f"{statistics.median(ratios):.2f} median of pairs (pairs {', '.join(f'{x:.2f}' for x in ratios)}).")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        p = argparse.ArgumentParser()
        p.add_argument("--worker", action="store_true")
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=1)
        p.add_argument("overrides", nargs="*")
        a = p.parse_args(argv)
        worker(Path(a.out), a.steps, a.overrides)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt3_125m")
    p.add_argument("--n-layer", type=int, default=5)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer; 0: the dense preset")
    p.add_argument("--expert-hidden", type=int, default=1536)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-layers", default="all")
    p.add_argument("--procs", default="1,2,4", help="world sizes of the memory table (1: trainer=single)")
    p.add_argument("--ep", default="1,2", help="expert-parallel degrees of the memory table (where they divide)")
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--mem-seq", type=int, default=32)
    p.add_argument("--time-procs", type=int, default=2)
    p.add_argument("--time-ep", type=int, default=1)
    p.add_argument("--time-batch", type=int, default=8, help="the global batch of the step-time launches")
    p.add_argument("--time-seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per step-time launch (after one warm-up)")
    p.add_argument("--repeats", type=int, default=4, help="interleaved ddp/fsdp pairs")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--json", help="also write every launch's per-rank records here")
    a = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_engines-"))
    data = corpus(root)
    model = model_overrides(a.preset, a.n_layer, a.experts, a.expert_hidden, a.top_k, a.moe_layers)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"model: {' '.join(model)}; torch {_torch_version()}; started {started}, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    rows, pairs, order = [], [], []
    if not a.skip_memory:
        n = 0
        for nproc in (int(x) for x in a.procs.split(",")):
            for ep in ([1] if nproc == 1 else [int(e) for e in a.ep.split(",") if nproc % int(e) == 0]):
                kind = "single" if nproc == 1 else "fsdp"
                t0 = time.perf_counter()
                n += 1
                r = measure_memory(nproc, kind, ep, [*model, *run_overrides(data, a.mem_batch, a.mem_seq, 1)],
                                   root / f"mem{n}")
                rows.append(r)
                print(f"  memory: {nproc} processes trainer={kind} ep={ep}: {time.perf_counter() - t0:.0f} s, load "
                      f"average {os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)
        total = rows[0]["params_total"]
        print(f"\n### Parameters and optimizer state per rank ({total / 1e6:.1f}M parameters; global batch "
              f"{a.mem_batch} x {a.mem_seq}; after 1 AdamW step)\n")
        print(memory_table(rows))
    if not a.skip_time:
        overrides = [*model, *run_overrides(data, a.time_batch, a.time_seq, a.steps + 1)]
        for i in range(a.repeats):
            kinds = ("ddp", "fsdp") if i % 2 == 0 else ("fsdp", "ddp")
            order.append(kinds[0])
            pair = {}
            for kind in kinds:
                t0 = time.perf_counter()
                ranks = launch(a.time_procs, kind, a.time_ep, overrides, a.steps + 1, root / f"time{i}_{kind}")
                pair[kind] = step_time(ranks)
                pair[kind + "_ranks"] = ranks
                print(f"  step time: trainer={kind} pair {i + 1}: {pair[kind] * 1e3:.0f} ms per step, launch "
                      f"{time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}", file=sys.stderr,
                      flush=True)
            pairs.append(pair)
        print(f"\n### Step time, trainer=ddp against trainer=fsdp ({a.time_procs} processes, ep {a.time_ep}, global "
              f"batch {a.time_batch} x {a.time_seq}; median of {a.steps} steps after a warm-up)\n")
        print(time_table(pairs, order))
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": model, "args": vars(a), "memory": rows, "time": pairs}, indent=1))


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
