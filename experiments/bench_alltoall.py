"""python -m experiments.bench_alltoall [--ranks 2] [--steps 10] [--batch 16] [--seq 128] [--preset tiny_moe]

Expert parallelism on CPU (gloo): spawns `ranks` processes (one thread each) training steps of a preset at
expert_parallel = ranks, and reports, measured side by side in the same run:
- the all-to-all volume per MoE layer and step (rows and bytes a rank sends, forward and backward),
- the share of the step's time spent inside the dispatcher's all-to-all calls (counts and rows, forward and
  backward) and inside the gradient reduction.
Numbers go to stdout as a Markdown table (docs/benchmarks.md records one run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    from moe import parallel
    from moe.config import MoEConfig
    from moe.model import Transformer
    from moe.presets import get_preset

    cfg = get_preset(args["preset"])
    cfg = cfg.replace(moe=MoEConfig(**{**cfg.moe.__dict__, "expert_parallel": world}))
    groups = parallel.make_groups(world, cfg.moe.num_experts)
    torch.manual_seed(0)
    model = parallel.distribute(Transformer(cfg), groups)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    timers = {"all_to_all": 0.0, "bytes": 0, "calls": 0}
    real = dist.all_to_all_single

    def timed(out_t, in_t, *a, **kw):  # every exchange of the dispatcher goes through here
        t0 = time.perf_counter()
        real(out_t, in_t, *a, **kw)
        timers["all_to_all"] += time.perf_counter() - t0
        timers["bytes"] += in_t.numel() * in_t.element_size()
        timers["calls"] += 1

    dist.all_to_all_single = timed
    B, S = args["batch"], args["seq"]
    g = torch.Generator().manual_seed(1)
    step_s, reduce_s, rows = 0.0, 0.0, 0
    for step in range(args["steps"] + 1):  # step 0 warms up
        idx = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        x, y = idx[rank::world], torch.roll(idx, -1, 1)[rank::world]
        if step == 1:
            timers.update(all_to_all=0.0, bytes=0, calls=0)
        dist.barrier()
        t0 = time.perf_counter()
        out = model(x, y)
        out.total_loss.backward()
        t1 = time.perf_counter()
        parallel.reduce_gradients(list(model.parameters()), groups)
        parallel.clip_grad_norm(list(model.parameters()), 1.0, groups)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= 1:
            step_s += t3 - t0
            reduce_s += t2 - t1
            E_l = cfg.moe.num_experts // world
            for s in out.stats.values():  # rows this rank sends to other ranks (its own experts' rows stay)
                counts = s["tokens_per_expert"]
                rows += int(counts.sum() - counts[rank * E_l:(rank + 1) * E_l].sum())
    n, L = args["steps"], len(cfg.sparse_layers)
    res = torch.tensor([step_s / n, timers["all_to_all"] / n, reduce_s / n, timers["bytes"] / n / L,
                        rows / n / L], dtype=torch.float64)
    dist.all_reduce(res)
    res /= world
    if rank == 0:
        Path(out_path).write_text(json.dumps({"step_s": res[0].item(), "all_to_all_s": res[1].item(),
                                         "reduce_s": res[2].item(), "bytes_per_layer": res[3].item(),
                                         "remote_rows_per_layer": res[4].item(), "d_model": cfg.d_model,
                                         "layers": L, "tokens_per_rank": B * S // world}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--preset", default="tiny_moe")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "bench.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(a.ranks, port, vars(a), str(out)), nprocs=a.ranks)
    r = json.loads(out.read_text())
    print("| preset | ranks = ep | tokens per rank | MoE layers | all-to-all bytes sent per layer and step "
          "(fwd+bwd, one rank) | rows sent to other ranks per layer (fwd) | step | in all-to-all | in gradient "
          "reduction |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.preset} | {a.ranks} | {r['tokens_per_rank']} | {r['layers']} | {r['bytes_per_layer'] / 1e6:.2f} MB "
          f"| {r['remote_rows_per_layer']:.0f} | {r['step_s'] * 1e3:.0f} ms | {r['all_to_all_s'] / r['step_s']:.1%} "
          f"| {r['reduce_s'] / r['step_s']:.1%} |")


if __name__ == "__main__":
    main()
